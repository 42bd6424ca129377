//! `parse_command` on arbitrary bytes: never panics; an accepted command
//! holds no CR, LF or NUL (nor any other control character but tab), and an
//! address it accepted prints (Display) to text that parses back to the same
//! address; its ESMTP parameters are known upper-case keywords, each once,
//! with values free of control characters; a refusal is a 5xx reply
//! (500..=555) whose text is fit to send.

#![no_main]

use kumo_listener::protocol::parser::{parse_command, Command, EsmtpParams, Mailbox, ReversePath};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    match parse_command(line) {
        Ok(command) => check_command(line, &command),
        Err(error) => {
            let reply = error.reply();
            let (code, enhanced, text) = (reply.code, reply.enhanced.unwrap_or_default(), reply.text);
            assert!((500..=555).contains(&code), "reply code {code} for {line:?}");
            assert!(is_enhanced_5xx(&enhanced), "enhanced code {enhanced:?} for {line:?}");
            assert!(!text.is_empty(), "empty reply text for {line:?}");
            assert!(!text.chars().any(char::is_control), "control character in reply {text:?}");
            assert_eq!(error.to_string(), format!("{code} {enhanced} {text}"));
        }
    }
});

fn check_command(line: &[u8], command: &Command) {
    // Only a line of UTF-8 without control characters (tab aside) is accepted.
    let text = std::str::from_utf8(line).expect("accepted a line that is not UTF-8");
    assert!(!text.chars().any(|c| c.is_control() && c != '\t'), "accepted control characters: {text:?}");
    for field in strings(command) {
        assert!(!field.contains(['\r', '\n', '\0']), "CR, LF or NUL in {field:?} of {command:?}");
    }
    match command {
        Command::MailFrom { reverse_path, params } => {
            if let ReversePath::Mailbox(mailbox) = reverse_path {
                assert!(!mailbox.domain.is_empty(), "sender without a domain: {command:?}");
                assert!(mailbox.params.is_empty(), "MAIL's parameters are in MailParams: {command:?}");
                round_trip("MAIL FROM", mailbox);
            }
            check_params(&params.all, &["SIZE", "BODY", "SMTPUTF8", "REQUIRETLS", "RET", "ENVID", "AUTH"]);
            assert_eq!(params.smtputf8, params.all.contains("SMTPUTF8"));
            assert_eq!(params.requiretls, params.all.contains("REQUIRETLS"));
            assert_eq!(params.size.is_some(), params.all.contains("SIZE"));
            assert_eq!(params.body.is_some(), params.all.contains("BODY"));
        }
        Command::RcptTo { forward_path } => {
            check_params(&forward_path.params, &["NOTIFY", "ORCPT"]);
            round_trip("RCPT TO", forward_path);
        }
        Command::Auth { mechanism, .. } => {
            assert!(!mechanism.is_empty() && *mechanism == mechanism.to_ascii_uppercase(), "{command:?}");
        }
        Command::Bdat { size, .. } => {
            let digits = text.split_whitespace().nth(1).expect("BDAT has a size");
            assert_eq!(digits.parse::<u64>().ok(), Some(*size), "{command:?}");
            assert!(digits.bytes().all(|byte| byte.is_ascii_digit()), "{command:?}");
        }
        Command::Ehlo(name) | Command::Helo(name) | Command::Lhlo(name) => {
            assert!(!name.is_empty() && !name.contains([' ', '\t']), "{command:?}");
        }
        _ => {}
    }
}

/// `Mailbox`'s Display output, put back in a command, parses to the same mailbox.
fn round_trip(verb: &str, mailbox: &Mailbox) {
    let again = format!("{verb}:<{mailbox}>");
    let reparsed = match parse_command(again.as_bytes()) {
        Ok(Command::MailFrom { reverse_path: ReversePath::Mailbox(reparsed), .. }) => reparsed,
        Ok(Command::RcptTo { forward_path }) => forward_path,
        other => panic!("{mailbox:?} displays as {again:?}, which parses as {other:?}"),
    };
    assert!(reparsed.same_address(mailbox), "{again:?} parses as {reparsed:?}, not {mailbox:?}");
    assert!(reparsed.params.is_empty());
}

/// Known keywords, each once; values without control characters; NOTIFY
/// is NEVER alone or a list; ORCPT has its `;`.
fn check_params(params: &EsmtpParams, known: &[&str]) {
    let keywords: Vec<&str> = params.iter().map(|(keyword, _)| keyword).collect();
    for (index, (keyword, value)) in params.iter().enumerate() {
        assert!(known.contains(&keyword), "{keyword} in {params:?}");
        assert!(!keywords[..index].contains(&keyword), "{keyword} twice in {params:?}");
        if let Some(value) = value {
            assert!(!value.chars().any(char::is_control), "control character in {params:?}");
        }
        match (keyword, value) {
            ("SMTPUTF8" | "REQUIRETLS", value) => assert_eq!(value, None),
            ("NOTIFY", Some(notify)) => {
                assert!(
                    notify == "NEVER" || notify.split(',').all(|item| ["SUCCESS", "FAILURE", "DELAY"].contains(&item))
                )
            }
            ("ORCPT", Some(orcpt)) => assert!(orcpt.contains(';'), "{orcpt:?}"),
            ("RET", Some(ret)) => assert!(ret == "FULL" || ret == "HDRS"),
            ("BODY", Some(body)) => assert!(body == "7BIT" || body == "8BITMIME"),
            (_, value) => assert!(value.is_some_and(|value| !value.is_empty()), "{keyword} in {params:?}"),
        }
    }
}

fn strings(command: &Command) -> Vec<&str> {
    match command {
        Command::Ehlo(text) | Command::Helo(text) | Command::Lhlo(text) => vec![text],
        Command::Vrfy(text) | Command::XClient(text) => vec![text],
        Command::MailFrom { reverse_path, params } => {
            let mut fields: Vec<&str> = params.all.iter().filter_map(|(_, value)| value).collect();
            if let ReversePath::Mailbox(mailbox) = reverse_path {
                fields.extend([mailbox.local_part.as_str(), mailbox.domain.as_str()]);
            }
            fields
        }
        Command::RcptTo { forward_path: mailbox } => {
            let mut fields = vec![mailbox.local_part.as_str(), mailbox.domain.as_str()];
            fields.extend(mailbox.params.iter().filter_map(|(_, value)| value));
            fields
        }
        Command::Auth { mechanism, initial_response } => {
            let mut fields = vec![mechanism.as_str()];
            fields.extend(initial_response.as_deref());
            fields
        }
        _ => Vec::new(),
    }
}

/// `5.X.Y` with 1 to 3 digits in X and Y.
fn is_enhanced_5xx(code: &str) -> bool {
    let parts: Vec<&str> = code.split('.').collect();
    parts.len() == 3
        && parts[0] == "5"
        && parts[1..].iter().all(|part| (1..=3).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()))
}
