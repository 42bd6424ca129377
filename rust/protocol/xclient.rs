//! Postfix XCLIENT (XCLIENT_README): `XCLIENT attribute=value ...`, with
//! values in RFC 3461 xtext. Pure logic: the session decides who may use it
//! and applies the result.

use super::reply::Reply;
use super::xtext::decode_xtext;
use std::net::IpAddr;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XClientRequest {
    /// `ADDR=`: `1.2.3.4`, or `IPV6:2001:db8::1`.
    pub addr: Option<IpAddr>,
    /// `PORT=`
    pub port: Option<u16>,
    /// `DESTADDR=`, written like `ADDR=`.
    pub destaddr: Option<IpAddr>,
    /// `DESTPORT=`
    pub destport: Option<u16>,
    /// `HELO=`
    pub helo: Option<String>,
    /// `NAME=`: the client's hostname.
    pub name: Option<String>,
    /// `LOGIN=`
    pub login: Option<String>,
    /// `PROTO=`: `SMTP` or `ESMTP`.
    pub proto: Option<String>,
}

/// Reply text for a `501 5.5.4`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XClientError(pub String);

impl XClientError {
    pub fn reply(self) -> Reply {
        Reply::with_text(501, "5.5.4", self.0)
    }
}

/// Postfix's limit on an attribute's value, before decoding.
const MAX_VALUE_LEN: usize = 255;
/// Values meaning "unknown": the field is left as it is.
const UNKNOWN_VALUES: [&str; 2] = ["[UNAVAILABLE]", "[TEMPUNAVAIL]"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attribute {
    Addr,
    Port,
    DestAddr,
    DestPort,
    Helo,
    Name,
    Login,
    Proto,
}

impl Attribute {
    const ALL: [Attribute; 8] = [
        Attribute::Addr,
        Attribute::Port,
        Attribute::DestAddr,
        Attribute::DestPort,
        Attribute::Helo,
        Attribute::Name,
        Attribute::Login,
        Attribute::Proto,
    ];

    fn name(self) -> &'static str {
        match self {
            Attribute::Addr => "ADDR",
            Attribute::Port => "PORT",
            Attribute::DestAddr => "DESTADDR",
            Attribute::DestPort => "DESTPORT",
            Attribute::Helo => "HELO",
            Attribute::Name => "NAME",
            Attribute::Login => "LOGIN",
            Attribute::Proto => "PROTO",
        }
    }

    fn named(name: &str) -> Option<Attribute> {
        Attribute::ALL.into_iter().find(|attribute| attribute.name().eq_ignore_ascii_case(name))
    }
}

/// Parse the text after `XCLIENT `.
pub fn parse_xclient(arguments: &str) -> Result<XClientRequest, XClientError> {
    let mut request = XClientRequest::default();
    let mut seen = Vec::new();
    for argument in arguments.split(' ').filter(|argument| !argument.is_empty()) {
        let Some((name, raw_value)) = argument.split_once('=') else {
            return Err(error(format!("attribute=value expected, got \"{}\"", printable(argument))));
        };
        let attribute =
            Attribute::named(name).ok_or_else(|| error(format!("unknown attribute \"{}\"", printable(name))))?;
        if seen.contains(&attribute) {
            return Err(error(format!("duplicate attribute {}", attribute.name())));
        }
        seen.push(attribute);
        apply(&mut request, attribute, raw_value)
            .map_err(|reason| error(format!("bad {} value: {reason}", attribute.name())))?;
    }
    if seen.is_empty() {
        return Err(error("XCLIENT needs at least one attribute"));
    }
    Ok(request)
}

fn error(text: impl Into<String>) -> XClientError {
    XClientError(text.into())
}

/// Client text fit to echo in a reply or a log line.
fn printable(text: &str) -> String {
    text.chars().map(|character| if character.is_ascii_graphic() { character } else { '?' }).collect()
}

fn apply(request: &mut XClientRequest, attribute: Attribute, raw_value: &str) -> Result<(), String> {
    if raw_value.is_empty() {
        return Err("empty".into());
    }
    if raw_value.len() > MAX_VALUE_LEN {
        return Err(format!("longer than {MAX_VALUE_LEN} characters"));
    }
    let value = decode_xtext(raw_value).map_err(str::to_owned)?;
    // Decoded text ends up in logs and trace headers: no line breaks or other controls.
    if value.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    let is_unknown = UNKNOWN_VALUES.iter().any(|unknown| unknown.eq_ignore_ascii_case(&value));
    if is_unknown && attribute != Attribute::Proto {
        return Ok(());
    }
    let not_valid = || format!("\"{}\" is not valid", printable(raw_value));
    match attribute {
        Attribute::Addr => request.addr = Some(parse_address(&value).ok_or_else(not_valid)?),
        Attribute::Port => request.port = Some(parse_port(&value).ok_or_else(not_valid)?),
        Attribute::DestAddr => request.destaddr = Some(parse_address(&value).ok_or_else(not_valid)?),
        Attribute::DestPort => request.destport = Some(parse_port(&value).ok_or_else(not_valid)?),
        Attribute::Helo => request.helo = Some(value),
        Attribute::Name => request.name = Some(value),
        Attribute::Login => request.login = Some(value),
        Attribute::Proto => request.proto = Some(parse_proto(&value).ok_or_else(not_valid)?),
    }
    Ok(())
}

/// `1.2.3.4` or `IPV6:` (any case) and an IPv6 address; IPv4-mapped IPv6
/// comes back as IPv4, as from the PROXY protocol decoder.
fn parse_address(value: &str) -> Option<IpAddr> {
    let ip = match value.get(..5) {
        Some(prefix) if prefix.eq_ignore_ascii_case("IPV6:") => IpAddr::V6(value[5..].parse().ok()?),
        _ => IpAddr::V4(value.parse().ok()?),
    };
    Some(ip.to_canonical())
}

/// Decimal 0..=65535, digits only.
fn parse_port(value: &str) -> Option<u16> {
    // u16's parser would also take a leading `+`.
    if !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn parse_proto(value: &str) -> Option<String> {
    ["SMTP", "ESMTP"].into_iter().find(|proto| proto.eq_ignore_ascii_case(value)).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &str) -> XClientRequest {
        parse_xclient(arguments).unwrap_or_else(|XClientError(reason)| panic!("{arguments:?}: {reason}"))
    }

    fn refusal(arguments: &str) -> String {
        match parse_xclient(arguments) {
            Err(XClientError(reason)) => reason,
            Ok(request) => panic!("{arguments:?} was accepted as {request:?}"),
        }
    }

    #[test]
    fn every_attribute() {
        let request = parse(
            "ADDR=192.0.2.1 PORT=1234 DESTADDR=IPV6:2001:db8::25 DESTPORT=25 HELO=client.example \
             NAME=mail.client.example LOGIN=alice PROTO=esmtp",
        );
        assert_eq!(
            request,
            XClientRequest {
                addr: Some("192.0.2.1".parse().unwrap()),
                port: Some(1234),
                destaddr: Some("2001:db8::25".parse().unwrap()),
                destport: Some(25),
                helo: Some("client.example".into()),
                name: Some("mail.client.example".into()),
                login: Some("alice".into()),
                proto: Some("ESMTP".into()),
            }
        );
    }

    #[test]
    fn names_are_case_insensitive_and_spaces_repeat() {
        let request = parse("  addr=192.0.2.1   Port=0  proto=Smtp ");
        assert_eq!(request.addr, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(request.port, Some(0));
        assert_eq!(request.proto.as_deref(), Some("SMTP"));
    }

    #[test]
    fn ipv6_addresses_need_the_prefix() {
        assert_eq!(parse("ADDR=IPV6:::1").addr, Some("::1".parse().unwrap()));
        assert_eq!(parse("ADDR=ipv6:2001:db8::1").addr, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse("ADDR=IPv6:::ffff:192.0.2.1").addr, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(refusal("ADDR=2001:db8::1"), "bad ADDR value: \"2001:db8::1\" is not valid");
        assert_eq!(refusal("ADDR=IPV6:192.0.2.1"), "bad ADDR value: \"IPV6:192.0.2.1\" is not valid");
    }

    #[test]
    fn unknown_values_leave_the_field_alone() {
        let request = parse("ADDR=[UNAVAILABLE] PORT=[TEMPUNAVAIL] DESTADDR=[unavailable] DESTPORT=[UNAVAILABLE]");
        assert_eq!(request, XClientRequest::default());
        let request = parse("HELO=[UNAVAILABLE] NAME=[UNAVAILABLE] LOGIN=[TEMPUNAVAIL]");
        assert_eq!(request, XClientRequest::default());
        assert_eq!(parse("NAME=+5BUNAVAILABLE+5D").name, None);
        assert_eq!(refusal("PROTO=[UNAVAILABLE]"), "bad PROTO value: \"[UNAVAILABLE]\" is not valid");
    }

    #[test]
    fn bad_values() {
        assert_eq!(refusal("ADDR=999.1.1.1"), "bad ADDR value: \"999.1.1.1\" is not valid");
        assert_eq!(refusal("DESTADDR=mail.example"), "bad DESTADDR value: \"mail.example\" is not valid");
        assert_eq!(refusal("PORT=70000"), "bad PORT value: \"70000\" is not valid");
        assert_eq!(refusal("DESTPORT=-1"), "bad DESTPORT value: \"-1\" is not valid");
        assert_eq!(refusal("PORT=+2B25"), "bad PORT value: \"+2B25\" is not valid");
        assert_eq!(refusal("PORT="), "bad PORT value: empty");
        assert_eq!(refusal("PROTO=LMTP"), "bad PROTO value: \"LMTP\" is not valid");
        assert_eq!(refusal("HELO=a+0D+0Ab"), "bad HELO value: contains a control character");
        assert_eq!(refusal(&format!("LOGIN={}", "x".repeat(256))), "bad LOGIN value: longer than 255 characters");
        assert_eq!(parse(&format!("LOGIN={}", "x".repeat(255))).login.map(|login| login.len()), Some(255));
    }

    #[test]
    fn bad_xtext() {
        for arguments in ["HELO=a+2", "HELO=a+zz", "HELO=a+2g", "HELO=a+2b"] {
            assert_eq!(refusal(arguments), "bad HELO value: bad xtext escape (+ and two upper-case hex digits)");
        }
        assert_eq!(refusal("HELO=a=b"), "bad HELO value: = must be escaped as +3D in xtext");
        assert_eq!(refusal("HELO=caf\u{e9}"), "bad HELO value: xtext allows only printable ASCII, other bytes as +XX");
        assert_eq!(refusal("HELO=a+FF"), "bad HELO value: xtext does not decode to UTF-8");
    }

    #[test]
    fn login_is_xtext_decoded() {
        assert_eq!(parse("LOGIN=user+2Bext+3D1").login.as_deref(), Some("user+ext=1"));
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(refusal(""), "XCLIENT needs at least one attribute");
        assert_eq!(refusal("   "), "XCLIENT needs at least one attribute");
        assert_eq!(refusal("FOO=1"), "unknown attribute \"FOO\"");
        assert_eq!(refusal("REVERSE_NAME=x"), "unknown attribute \"REVERSE_NAME\"");
        assert_eq!(refusal("=1"), "unknown attribute \"\"");
        assert_eq!(refusal("ADDR"), "attribute=value expected, got \"ADDR\"");
        assert_eq!(refusal("ADDR=192.0.2.1 addr=192.0.2.2"), "duplicate attribute ADDR");
        assert_eq!(refusal("ADDR=[UNAVAILABLE] ADDR=192.0.2.2"), "duplicate attribute ADDR");
        assert_eq!(refusal("NAME=x\tLOGIN=y"), "bad NAME value: xtext allows only printable ASCII, other bytes as +XX");
        assert_eq!(refusal("F\u{7}O=1"), "unknown attribute \"F?O\"");
    }

    /// xorshift64: enough randomness for inputs, and no crate.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
            choices[(self.next() % choices.len() as u64) as usize]
        }
    }

    #[test]
    fn random_arguments_never_panic() {
        let pieces = [
            "ADDR",
            "port",
            "DESTADDR",
            "DESTPORT",
            "HELO",
            "NAME",
            "LOGIN",
            "PROTO",
            "X",
            "=",
            "=",
            " ",
            "+",
            "+2",
            "+C3",
            "+A9",
            "+0A",
            "A",
            "f",
            "1",
            "9",
            ".",
            ":",
            "::",
            "IPV6:",
            "[UNAVAILABLE]",
            "\u{e9}",
            "\t",
            "65536",
            "\u{1F600}",
        ];
        let mut random = Random(0x2545_F491_4F6C_DD1D);
        for _ in 0..5000 {
            let arguments: String = (0..random.next() % 12).map(|_| random.pick(&pieces)).collect();
            if let Ok(request) = parse_xclient(&arguments) {
                let texts = [&request.helo, &request.name, &request.login, &request.proto];
                assert!(texts.into_iter().flatten().all(|text| !text.chars().any(char::is_control)));
            }
            let _ = decode_xtext(&arguments);
        }
    }
}
