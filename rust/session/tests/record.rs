//! The log lines: why a session ended and after which command, the counts,
//! the levels, and text lines that read back to the same values as their
//! JSON fields whatever the client sends.

use super::*;
use crate::log::{LogRecord, LOG_INFO, LOG_WARNING};

/// Wait (a little, in real time) for a line starting with `start`.
async fn line_starting(harness: &Harness, start: &str) -> String {
    for _ in 0..200 {
        if let Some(line) = harness.logs().into_iter().find(|line| line.starts_with(start)) {
            return line;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no line starting with {start:?} in {:#?}", harness.logs());
}

fn relaying() -> Harness {
    plain(json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "client_timeout": 5}))
}

#[tokio::test(start_paused = true)]
async fn a_timeout_is_logged_after_the_last_command_and_does_not_refuse_it() {
    let harness = relaying();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    assert_eq!(client.code("RCPT TO:<c@d.test>").await.0, 250);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(client.reply().await, (421, vec!["4.3.2 mx.test idle too long, closing connection".into()]));
    client.expect_closed().await;
    let disconnect = line_starting(&harness, "disconnect from").await;
    assert!(disconnect.ends_with(" ehlo=1 mail=1 rcpt=1 commands=3 reason=timeout"), "{disconnect}");
    let timeout = line_starting(&harness, "timeout after").await;
    assert_eq!(
        timeout,
        "timeout after RCPT from 192.0.2.10:40000: 421 4.3.2 idle too long, closing connection; helo=client.test"
    );
    assert!(!harness.logs().iter().any(|line| line.starts_with("reject:")), "{:#?}", harness.logs());
}

#[tokio::test(start_paused = true)]
async fn a_timeout_after_many_rsets_counts_them_all_as_accepted() {
    let harness = relaying();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(&b"RSET\r\n".repeat(2000)).await;
    for _ in 0..2000 {
        assert_eq!(client.reply().await.0, 250);
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(client.reply().await.0, 421);
    let disconnect = line_starting(&harness, "disconnect from").await;
    assert!(disconnect.ends_with(" ehlo=1 rset=2000 commands=2001 reason=timeout"), "{disconnect}");
    line_starting(&harness, "timeout after RSET from 192.0.2.10:40000: 421 ").await;
}

#[tokio::test(start_paused = true)]
async fn a_timeout_in_the_middle_of_a_message_fails_its_data() {
    let harness = relaying();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n").await;
    assert_eq!(codes_of(&mut client, 3).await.last().unwrap().0, 354);
    client.send(b"Subject: x\r\n").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(client.reply().await.0, 421);
    let disconnect = line_starting(&harness, "disconnect from").await;
    assert!(disconnect.ends_with(" data=0/1 commands=3/4 reason=timeout"), "{disconnect}");
    line_starting(&harness, "timeout after DATA from").await;
}

#[tokio::test]
async fn shutdown_is_logged_after_the_last_command_and_does_not_refuse_it() {
    let harness = relaying();
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("RCPT TO:<c@d.test>").await.0, 503);
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    harness.shut_down();
    assert_eq!(client.reply().await, (421, vec!["4.3.2 mx.test shutting down".into()]));
    let disconnect = line_starting(&harness, "disconnect from").await;
    assert!(disconnect.ends_with(" ehlo=1 mail=1 rcpt=0/1 commands=2/3 reason=shutdown"), "{disconnect}");
    line_starting(&harness, "shutdown after MAIL from 192.0.2.10:40000: 421 4.3.2 shutting down; helo=client.test")
        .await;
}

#[tokio::test]
async fn the_disconnect_line_says_why_the_session_ended() {
    let harness = relaying();
    let mut quitting = greeted(&harness, CLIENT).await;
    quitting.command("QUIT").await;
    let mut erring = greeted(&harness, "192.0.2.11:1").await;
    for _ in 0..19 {
        assert_eq!(erring.code("BOGUS").await.0, 500);
    }
    assert_eq!(erring.code("BOGUS").await.0, 500);
    assert_eq!(erring.reply().await, (421, vec!["4.7.0 mx.test too many errors".into()]));
    let mut leaving = greeted(&harness, "192.0.2.12:1").await;
    leaving.command("EHLO client.test").await;
    drop(leaving);
    let mut talking = greeted(&harness, "192.0.2.13:1").await;
    talking.send(b"NOOP\r\nNOOP\r\n").await;
    assert_eq!(talking.reply().await.0, 554);
    for (client, counts) in [
        ("192.0.2.10:40000", "quit=1 commands=1 reason=quit"),
        ("192.0.2.11:1", "unknown=0/20 commands=0/20 reason=error-limit"),
        ("192.0.2.12:1", "ehlo=1 commands=1 reason=client-closed"),
        ("192.0.2.13:1", "noop=0/1 commands=0/1 reason=protocol-error"),
    ] {
        let disconnect = line_starting(&harness, &format!("disconnect from {client} ")).await;
        assert!(disconnect.ends_with(counts), "{disconnect}");
    }
    line_starting(&harness, "too many errors after UNKNOWN from 192.0.2.11:1: 421 4.7.0 too many errors; helo=").await;
    line_starting(&harness, "lost connection after EHLO from 192.0.2.12:1; helo=client.test").await;
    let errors = harness.logs().iter().filter(|line| line.starts_with("reject: UNKNOWN from 192.0.2.11:1")).count();
    assert_eq!(errors, 20, "one line per refused command, none for the 421");
}

#[tokio::test]
async fn a_policy_refusal_is_info_whatever_its_code_and_a_handler_failure_a_warning() {
    let script = |event: &Event| match event {
        Event::MailFrom { sender, .. } if sender.local_part == "later" => {
            Outcome::Reject { code: 451, text: "4.7.1 try later".into() }
        }
        Event::MailFrom { sender, .. } if sender.local_part == "broken" => Outcome::Failed("database down".into()),
        _ => nothing(event),
    };
    let harness = harness(json!({"hostname": "mx.test"}), &[EventKind::MailFrom], script);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("MAIL FROM:<later@b.test>").await, (451, "4.7.1 try later".into()));
    assert_eq!(client.code("MAIL FROM:<broken@b.test>").await.0, 451);
    client.command("QUIT").await;
    line_starting(&harness, "disconnect from").await;
    let levels: Vec<(u8, String)> = harness
        .records()
        .into_iter()
        .filter(|record| record.message.starts_with("reject: MAIL"))
        .map(|record| (record.level, record.message.split(": ").nth(2).unwrap()[..9].to_string()))
        .collect();
    assert_eq!(levels, [(LOG_INFO, "451 4.7.1".to_string()), (LOG_WARNING, "451 4.3.0".to_string())]);
}

#[test]
fn messages_get_the_grace_but_a_second_to_finish_in() {
    let now = tokio::time::Instant::now();
    let ends = |seconds: f64| crate::session::message_grace_ends(now, Duration::from_secs_f64(seconds)) - now;
    assert_eq!(ends(30.0), Duration::from_secs(29));
    assert_eq!(ends(2.0), Duration::from_secs(1));
    assert_eq!(ends(1.0), Duration::from_millis(500));
    assert_eq!(ends(0.0), Duration::ZERO);
    let forever = crate::session::message_grace_ends(now, Duration::MAX) - now;
    assert!(forever > Duration::from_secs(300 * 24 * 3600));
}

#[tokio::test]
async fn a_message_being_received_at_shutdown_may_finish_within_the_grace() {
    let (harness, seen) = recording_bodies(json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n").await;
    assert_eq!(codes_of(&mut client, 3).await.last().unwrap().0, 354);
    client.send(b"Subject: x\r\n\r\nfirst half\r\n").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    harness.shut_down_with_grace(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.send(b"second half\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 250);
    // Then the next command is not waited for.
    assert_eq!(client.reply().await, (421, vec!["4.3.2 mx.test shutting down".into()]));
    client.expect_closed().await;
    assert_eq!(seen.take(), ["Subject: x\r\n\r\nfirst half\r\nsecond half\r\n"]);
    let disconnect = line_starting(&harness, "disconnect from").await;
    assert!(disconnect.ends_with(" data=1 commands=4 reason=shutdown"), "{disconnect}");
    line_starting(&harness, "shutdown after DATA from").await;
}

#[tokio::test]
async fn chunks_being_received_at_shutdown_may_finish_within_the_grace() {
    let (harness, seen) = recording_bodies(json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 12\r\nSubject: x\r\n").await;
    assert_eq!(codes_of(&mut client, 3).await.last().unwrap().0, 250);
    harness.shut_down_with_grace(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.send(b"BDAT 6 LAST\r\n\r\nbody").await;
    assert_eq!(client.reply().await.0, 250);
    assert_eq!(client.reply().await.0, 421);
    assert_eq!(seen.take(), ["Subject: x\r\n\r\nbody"]);
}

#[tokio::test(start_paused = true)]
async fn a_message_not_finished_within_the_grace_gets_421_and_is_not_stored() {
    let (harness, seen) = recording_bodies(json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n").await;
    assert_eq!(codes_of(&mut client, 3).await.last().unwrap().0, 354);
    client.send(b"Subject: x\r\n").await;
    harness.shut_down_with_grace(Duration::from_secs(10));
    // A trickle does not stretch the grace (9 s for messages, of 10).
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.send(b"x\r\n").await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(client.reply().await, (421, vec!["4.3.2 mx.test shutting down".into()]));
    client.expect_closed().await;
    assert!(seen.take().is_empty());
    let disconnect = line_starting(&harness, "disconnect from").await;
    assert!(disconnect.ends_with(" data=0/1 commands=3/4 reason=shutdown"), "{disconnect}");
}

// ------------------------------------------------ text lines read back

/// A value of the documented text format (docs/operations/logs.md): a
/// double-quoted string with `\"`, `\\`, `\xNN` and `\u{…}` escapes, or
/// bare up to `end` (a character that a bare value cannot hold).
fn read_value<'a>(line: &'a str, end: &[char]) -> (String, &'a str) {
    let Some(quoted) = line.strip_prefix('"') else {
        let stop = line.find(end).unwrap_or(line.len());
        return (line[..stop].to_string(), &line[stop..]);
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '"' => return (value, &quoted[index + 1..]),
            '\\' => match chars.next().expect("an escape").1 {
                'x' => {
                    let hex: String = (0..2).map(|_| chars.next().unwrap().1).collect();
                    value.push(char::from(u8::from_str_radix(&hex, 16).unwrap()));
                }
                'u' => {
                    assert_eq!(chars.next().unwrap().1, '{');
                    let hex: String = chars.by_ref().map(|(_, c)| c).take_while(|&c| c != '}').collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                escaped => value.push(escaped),
            },
            c => value.push(c),
        }
    }
    panic!("unterminated quoted value in {line:?}");
}

/// An address: `<bare>` or a quoted string.
fn read_address(line: &str) -> (String, &str) {
    match line.strip_prefix('<') {
        Some(bare) => {
            let (value, rest) = read_value(bare, &['>']);
            (value, rest.strip_prefix('>').expect("a closing bracket"))
        }
        None => {
            assert!(line.starts_with('"'), "{line:?}");
            read_value(line, &[])
        }
    }
}

fn after<'a>(line: &'a str, expected: &str) -> &'a str {
    line.strip_prefix(expected).unwrap_or_else(|| panic!("{expected:?} expected at {line:?}"))
}

fn word(line: &str) -> (&str, &str) {
    line.split_once(' ').unwrap_or((line, ""))
}

/// The fields a text line says, parsed as the documentation describes it.
fn read_line(message: &str) -> Value {
    if let Some(rest) = message.strip_prefix("stored: ") {
        let (id, rest) = word(rest);
        let (sender, mut rest) = read_address(after(rest, "from="));
        rest = after(rest, " to=");
        let mut recipients = Vec::new();
        loop {
            let (recipient, next) = read_address(rest);
            recipients.push(recipient);
            match next.strip_prefix(',') {
                Some(more) => rest = more,
                None => {
                    rest = next;
                    break;
                }
            }
        }
        let (size, rest) = word(after(rest, " size="));
        let (client, rest) = word(after(rest, "client="));
        let (via, _) = word(after(rest, "via="));
        return json!({"event": "stored", "id": id, "sender": sender, "recipients": recipients,
            "size": size.parse::<u64>().unwrap(), "client": client, "via": via});
    }
    let (event, rest) = ["reject: ", "timeout after ", "shutdown after ", "too many errors after "]
        .iter()
        .find_map(|start| message.strip_prefix(start).map(|rest| (*start, rest)))
        .unwrap_or_else(|| panic!("not a line with a reply: {message:?}"));
    let event = match event {
        "reject: " => "reject",
        "too many errors after " => "too_many_errors",
        other => other.trim_end_matches(" after "),
    };
    let (command, rest) = word(rest);
    let (client, rest) = after(rest, "from ").split_once(": ").unwrap();
    let (code, rest) = word(rest);
    let (enhanced, rest) = word(rest);
    let (text, rest) = read_value(rest, &[';']);
    let (helo, rest) = read_value(after(rest, "; helo="), &[' ']);
    assert_eq!(rest, "", "{message:?}");
    json!({"event": event, "command": command, "client": client, "code": code.parse::<u16>().unwrap(),
        "enhanced": enhanced, "text": text, "helo": helo})
}

/// Each field the text line gives has the value of the record's field of that name.
fn assert_reads_back(record: &LogRecord) {
    let fields = record.fields.as_ref().unwrap_or_else(|| panic!("no fields: {record:?}"));
    let read = read_line(&record.message);
    for (name, value) in read.as_object().unwrap() {
        assert_eq!(Some(value), fields.get(name), "{name} of {:?}, fields {fields:?}", record.message);
    }
}

/// What a client chose, with everything that could pass for another field
/// or hide: spaces, `=`, `<>`, quotes, backslashes, `;`, U+2028, U+202E…
#[tokio::test]
async fn text_lines_read_back_to_their_json_fields_whatever_the_client_sends() {
    let script = |event: &Event| match event {
        Event::RcptTo { recipient, .. } if recipient.local_part.starts_with("refuse") => Outcome::Reject {
            code: 550,
            text: format!("5.1.1 <{recipient}>: no; helo=forged \"x\" \\ \u{2028}\u{202e}"),
        },
        _ => nothing(event),
    };
    let params = json!({"hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"]});
    let harness = harness(params, &[EventKind::RcptTo], script);
    let mut client = greeted(&harness, CLIENT).await;
    let helo = "h\u{2028}elo=x\"<>\\\u{202e};x";
    assert_eq!(client.command(&format!("EHLO {helo}")).await.0, 250);
    let forged = "\"a> to=<victim@example.com> size=1 client=203.0.113.66:1 x\"@b.example";
    assert_eq!(client.code(&format!("MAIL FROM:<{forged}> SMTPUTF8")).await.0, 250);
    let recipients = [
        "\"c d\"@x.example",
        "r\u{2028}\u{202e}\u{200b}@例え.jp",
        "SRS0=ab=cd=x.example=u@fwd.example",
        "\"a\\\\b\\\"q\"@x.example",
        "plain@x.example",
        "\"refuse me; helo=x\"@x.example",
    ];
    for recipient in recipients {
        client.command(&format!("RCPT TO:<{recipient}>")).await;
    }
    client.send(b"DATA\r\n").await;
    assert_eq!(client.reply().await.0, 354);
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(client.reply().await.0, 250);
    for _ in 0..20 {
        client.command("BOGUS =<>").await;
    }
    assert_eq!(client.reply().await.0, 421);
    client.expect_closed().await;
    line_starting(&harness, "disconnect from").await;

    let records = harness.records();
    let checked = |start: &str| records.iter().filter(|record| record.message.starts_with(start)).count();
    for record in records.iter().filter(|record| !record.message.starts_with("disconnect")) {
        assert_reads_back(record);
        assert!(!record.message.contains(['\u{2028}', '\u{202e}', '\u{200b}', '\n', '\r']), "{record:?}");
        // No regular expression finds the forged fields.
        for forged in ["to=<victim", "client=203.0.113.66", "size=1 ", "helo=forged", "helo=x"] {
            assert!(!record.message.contains(forged), "{forged} in {:?}", record.message);
        }
    }
    // Split per recipient: one stored line each, but for the refused one.
    assert_eq!(checked("stored: "), 5);
    assert_eq!(checked("reject: RCPT"), 1);
    assert_eq!(checked("reject: UNKNOWN"), 20);
    assert_eq!(checked("too many errors after UNKNOWN"), 1);
    let stored = records.iter().find(|record| record.message.contains("plain@x.example")).unwrap();
    let sender = r#" from="\"a> to\x3d<victim@example.com> size\x3d1 client\x3d203.0.113.66:1 x\"@b.example" "#;
    assert!(stored.message.contains(&format!("{sender}to=<plain@x.example> size=")), "{}", stored.message);
}
