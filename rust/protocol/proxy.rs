//! HAProxy PROXY protocol header decoder (v1 text and v2 binary), after
//! HAProxy's proxy-protocol.txt and as strict as Postfix's haproxy_srvr.c.
//! Pure logic: the caller passes everything received so far and reads more
//! while the answer is [`ProxyDecode::Incomplete`].
//!
//! IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) come back as IPv4, as in
//! Postfix, so that a proxied IPv4 client looks the same over either family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The real client (source) and the address it connected to (destination).
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// v1 `PROXY UNKNOWN` or v2 LOCAL (health checks) or v2 with an
    /// unsupported family (AF_UNIX/UNSPEC): keep the socket's own addresses.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyDecode {
    /// A whole header: `consumed` bytes of input are the header (bytes after
    /// it, e.g. a pipelined EHLO, are not part of it).
    Header { header: ProxyHeader, consumed: usize },
    /// The input so far is a valid prefix of a header: read more.
    Incomplete,
    /// Not a valid header: the connection must be closed. The String says why (for the log).
    Invalid(String),
}

const NOT_A_HEADER: &str = "not a PROXY protocol header";

/// The longest v1 header, CRLF included.
const V1_MAX_LEN: usize = 107;
const V1_MAX_LINE: usize = V1_MAX_LEN - 2;
const V1_START: &[u8] = b"PROXY ";
const V1_PROTOCOLS: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
const BAD_PROTOCOL: &str = "bad or missing protocol type";
const EXTRA_FIELD: &str = "unexpected field after the destination port";
/// The errors for the fields after `TCP4`/`TCP6`, in their order.
const TCP_FIELD_ERRORS: [&str; 4] = [
    "bad or missing source address",
    "bad or missing destination address",
    "bad or missing source port",
    "bad or missing destination port",
];

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family and the 2-byte length of the rest.
const V2_FIXED_LEN: usize = 16;
const V2_LOCAL: u8 = 0x0;
const V2_PROXY: u8 = 0x1;
const SHORT_ADDRESSES: &str = "address block too short for its family";
const TRUNCATED_TLV: &str = "truncated TLV";

/// Decode the PROXY header at the start of `input`, all the bytes received
/// so far on the connection.
pub fn decode_proxy_header(input: &[u8]) -> ProxyDecode {
    match input.first() {
        None => ProxyDecode::Incomplete,
        Some(b'P') => decode_v1(input),
        Some(b'\r') => decode_v2(input),
        Some(_) => ProxyDecode::Invalid(NOT_A_HEADER.into()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn decode_v1(input: &[u8]) -> ProxyDecode {
    let window = &input[..input.len().min(V1_MAX_LINE + 1)];
    let line_end = window.iter().position(|&byte| byte == b'\r' || byte == b'\n');
    // A reason a shorter prefix already gave stands, whatever comes next.
    if let Err(reason) = check_v1_start(&input[..line_end.unwrap_or(window.len())]) {
        return ProxyDecode::Invalid(reason.into());
    }
    let Some(line_end) = line_end else {
        if input.len() > V1_MAX_LINE {
            return ProxyDecode::Invalid(format!("no CRLF within {V1_MAX_LEN} bytes"));
        }
        return ProxyDecode::Incomplete;
    };
    let line = &input[..line_end];
    // The line is judged as soon as it ends, before how it ends.
    let outcome = parse_v1_line(line).and_then(|header| match input[line_end..] {
        [b'\r', b'\n', ..] => Ok(ProxyDecode::Header { header, consumed: line_end + 2 }),
        [b'\r'] => Ok(ProxyDecode::Incomplete),
        [b'\r', ..] => Err("CR not followed by LF"),
        _ => Err("line ends in a bare LF"),
    });
    outcome.unwrap_or_else(|reason| ProxyDecode::Invalid(reason.into()))
}

fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, &'static str> {
    let rest = line.strip_prefix(V1_START).ok_or(NOT_A_HEADER)?;
    let mut parts = rest.splitn(2, is_space);
    let protocol = parts.next().unwrap_or_default();
    let Some(family) = v1_family(protocol)? else {
        return Ok(ProxyHeader::Local);
    };
    let mut fields = parts.next().unwrap_or_default().split(is_space);
    let source_ip = fields.next().and_then(|field| address_field(field, family)).ok_or(TCP_FIELD_ERRORS[0])?;
    let destination_ip = fields.next().and_then(|field| address_field(field, family)).ok_or(TCP_FIELD_ERRORS[1])?;
    let source_port = fields.next().and_then(port_field).ok_or(TCP_FIELD_ERRORS[2])?;
    let destination_port = fields.next().and_then(port_field).ok_or(TCP_FIELD_ERRORS[3])?;
    if fields.next().is_some() {
        return Err(EXTRA_FIELD);
    }
    Ok(ProxyHeader::Proxied {
        source: SocketAddr::new(source_ip, source_port),
        destination: SocketAddr::new(destination_ip, destination_port),
    })
}

/// Whether a v1 line whose end has not arrived yet can still become a valid header.
fn check_v1_start(line: &[u8]) -> Result<(), &'static str> {
    let Some(rest) = line.strip_prefix(V1_START) else {
        return if V1_START.starts_with(line) { Ok(()) } else { Err(NOT_A_HEADER) };
    };
    let mut parts = rest.splitn(2, is_space);
    let protocol = parts.next().unwrap_or_default();
    let Some(tcp_fields) = parts.next() else {
        let could_be_protocol = V1_PROTOCOLS.iter().any(|known| known.starts_with(protocol));
        return if could_be_protocol { Ok(()) } else { Err(BAD_PROTOCOL) };
    };
    match v1_family(protocol)? {
        None => Ok(()),
        Some(family) => check_tcp_fields_start(tcp_fields, family),
    }
}

/// `None` for `UNKNOWN`, after which anything may follow.
fn v1_family(protocol: &[u8]) -> Result<Option<Family>, &'static str> {
    match protocol {
        b"TCP4" => Ok(Some(Family::V4)),
        b"TCP6" => Ok(Some(Family::V6)),
        b"UNKNOWN" => Ok(None),
        _ => Err(BAD_PROTOCOL),
    }
}

/// The fields after `TCP4 `/`TCP6 ` so far: all but the last must be whole
/// and valid; the last one may still grow.
fn check_tcp_fields_start(text: &[u8], family: Family) -> Result<(), &'static str> {
    let fields: Vec<&[u8]> = text.split(is_space).collect();
    // Field by field, so that the first bad one is named, as for any prefix.
    for (index, field) in fields.iter().enumerate() {
        if index == TCP_FIELD_ERRORS.len() {
            return Err(EXTRA_FIELD);
        }
        let is_growing = index + 1 == fields.len();
        let is_address = index < 2;
        let acceptable = match (is_address, is_growing) {
            (true, false) => address_field(field, family).is_some(),
            (true, true) => address_can_complete(field, family),
            (false, false) => port_field(field).is_some(),
            // Every non-empty prefix of a valid port is itself a valid port.
            (false, true) => field.is_empty() || port_field(field).is_some(),
        };
        if !acceptable {
            return Err(TCP_FIELD_ERRORS[index]);
        }
    }
    Ok(())
}

fn is_space(byte: &u8) -> bool {
    *byte == b' '
}

fn address_field(field: &[u8], family: Family) -> Option<IpAddr> {
    let text = std::str::from_utf8(field).ok()?;
    match family {
        Family::V4 => text.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        Family::V6 => text.parse::<Ipv6Addr>().ok().map(|ip| IpAddr::V6(ip).to_canonical()),
    }
}

/// Whether more bytes can turn `field` into a valid address. Every prefix of
/// an octet or group is itself a valid octet or group, so a few fixed
/// endings reach a valid address whenever one exists.
fn address_can_complete(field: &[u8], family: Family) -> bool {
    let endings: &[&[u8]] = match family {
        Family::V4 => &[b"", b"0", b".0", b"0.0", b".0.0", b"0.0.0", b".0.0.0", b"0.0.0.0"],
        Family::V6 => &[b"", b"0", b":", b"::", b":0", b".0", b"0.0", b".0.0", b"0.0.0"],
    };
    endings.iter().any(|ending| address_field(&[field, ending].concat(), family).is_some())
}

/// Decimal 0..=65535 without sign or leading zeros.
fn port_field(field: &[u8]) -> Option<u16> {
    let has_leading_zero = field.len() > 1 && field[0] == b'0';
    if has_leading_zero || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn decode_v2(input: &[u8]) -> ProxyDecode {
    match decode_v2_checked(input) {
        Ok(Some((header, consumed))) => ProxyDecode::Header { header, consumed },
        Ok(None) => ProxyDecode::Incomplete,
        Err(reason) => ProxyDecode::Invalid(reason),
    }
}

/// What the address block of a v2 header holds for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V2Addresses {
    Tcp4,
    Tcp6,
    /// LOCAL, UNSPEC or UNIX: the whole block is skipped.
    Ignored,
}

impl V2Addresses {
    fn len(self) -> usize {
        match self {
            V2Addresses::Tcp4 => 12,
            V2Addresses::Tcp6 => 36,
            V2Addresses::Ignored => 0,
        }
    }
}

/// `Ok(None)` while the input is a valid start of a header.
fn decode_v2_checked(input: &[u8]) -> Result<Option<(ProxyHeader, usize)>, String> {
    if !V2_SIGNATURE.starts_with(&input[..input.len().min(V2_SIGNATURE.len())]) {
        return Err(NOT_A_HEADER.into());
    }
    let Some(&version_command) = input.get(12) else { return Ok(None) };
    let command = v2_command(version_command)?;
    let Some(&family) = input.get(13) else { return Ok(None) };
    let addresses = v2_addresses(command, family)?;
    let Some(&[length_high, length_low]) = input.get(14..V2_FIXED_LEN) else { return Ok(None) };
    let block_len = usize::from(u16::from_be_bytes([length_high, length_low]));
    if block_len < addresses.len() {
        return Err(SHORT_ADDRESSES.into());
    }
    let consumed = V2_FIXED_LEN + block_len;
    let Some(block) = input.get(V2_FIXED_LEN..consumed) else { return Ok(None) };
    Ok(Some((read_v2_block(addresses, block)?, consumed)))
}

fn v2_command(version_command: u8) -> Result<u8, String> {
    let version = version_command >> 4;
    let command = version_command & 0x0F;
    if version != 2 {
        return Err(format!("unsupported PROXY protocol version {version}"));
    }
    if command != V2_LOCAL && command != V2_PROXY {
        return Err(format!("unknown PROXY protocol v2 command {command:#X}"));
    }
    Ok(command)
}

fn v2_addresses(command: u8, family: u8) -> Result<V2Addresses, String> {
    if command == V2_LOCAL {
        return Ok(V2Addresses::Ignored);
    }
    match family {
        0x11 => Ok(V2Addresses::Tcp4),
        0x21 => Ok(V2Addresses::Tcp6),
        0x00 | 0x31 | 0x32 => Ok(V2Addresses::Ignored),
        0x12 | 0x22 => Err(format!("UDP (family {family:#04X}) is not supported")),
        _ => Err(format!("unknown address family {family:#04X}")),
    }
}

fn read_v2_block(addresses: V2Addresses, block: &[u8]) -> Result<ProxyHeader, String> {
    let (header, tlvs) = match addresses {
        V2Addresses::Ignored => return Ok(ProxyHeader::Local),
        V2Addresses::Tcp4 => tcp_addresses::<4>(block),
        V2Addresses::Tcp6 => tcp_addresses::<16>(block),
    }
    .ok_or(SHORT_ADDRESSES)?;
    check_tlvs(tlvs)?;
    Ok(header)
}

/// Source IP, destination IP, source port, destination port (big-endian),
/// and the bytes after them.
fn tcp_addresses<const IP_LEN: usize>(block: &[u8]) -> Option<(ProxyHeader, &[u8])>
where
    IpAddr: From<[u8; IP_LEN]>,
{
    let (source_ip, rest) = block.split_first_chunk::<IP_LEN>()?;
    let (destination_ip, rest) = rest.split_first_chunk::<IP_LEN>()?;
    let (source_port, rest) = rest.split_first_chunk::<2>()?;
    let (destination_port, tlvs) = rest.split_first_chunk::<2>()?;
    let socket = |ip: &[u8; IP_LEN], port: &[u8; 2]| {
        SocketAddr::new(IpAddr::from(*ip).to_canonical(), u16::from_be_bytes(*port))
    };
    let header = ProxyHeader::Proxied {
        source: socket(source_ip, source_port),
        destination: socket(destination_ip, destination_port),
    };
    Some((header, tlvs))
}

/// Each TLV is a type byte, a 2-byte big-endian length and the value; they
/// must fill the rest of the block exactly.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), &'static str> {
    while let Some((&[_kind, length_high, length_low], rest)) = tlvs.split_first_chunk::<3>() {
        let value_len = usize::from(u16::from_be_bytes([length_high, length_low]));
        tlvs = rest.get(value_len..).ok_or(TRUNCATED_TLV)?;
    }
    if tlvs.is_empty() {
        Ok(())
    } else {
        Err(TRUNCATED_TLV)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> ProxyDecode {
        decode_proxy_header(input)
    }

    fn socket(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn proxied(source: &str, destination: &str) -> ProxyHeader {
        ProxyHeader::Proxied { source: socket(source), destination: socket(destination) }
    }

    fn whole(input: &[u8], header: ProxyHeader) -> ProxyDecode {
        ProxyDecode::Header { header, consumed: input.len() }
    }

    fn invalid(reason: &str) -> ProxyDecode {
        ProxyDecode::Invalid(reason.into())
    }

    fn assert_invalid(input: &[u8]) {
        let outcome = decode(input);
        assert!(matches!(outcome, ProxyDecode::Invalid(_)), "{:?} gave {outcome:?}", String::from_utf8_lossy(input));
    }

    fn v2(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let block_len = u16::try_from(block.len()).unwrap();
        v2_declaring(version_command, family, block_len, block)
    }

    fn v2_declaring(version_command: u8, family: u8, block_len: u16, block: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([version_command, family]);
        header.extend(block_len.to_be_bytes());
        header.extend(block);
        header
    }

    fn tcp4_block() -> Vec<u8> {
        [&[192, 0, 2, 1, 198, 51, 100, 2][..], &1234u16.to_be_bytes(), &25u16.to_be_bytes()].concat()
    }

    fn tcp6_block(source: Ipv6Addr, destination: Ipv6Addr) -> Vec<u8> {
        [source.octets(), destination.octets()].concat().into_iter().chain([0, 123, 1, 65]).collect()
    }

    fn authority_tlv(name: &str) -> Vec<u8> {
        let mut tlv = vec![0x02];
        tlv.extend(u16::try_from(name.len()).unwrap().to_be_bytes());
        tlv.extend(name.as_bytes());
        tlv
    }

    #[test]
    fn v1_tcp4() {
        let line = b"PROXY TCP4 1.2.3.4 4.3.2.1 123 321\r\n";
        assert_eq!(decode(line), whole(line, proxied("1.2.3.4:123", "4.3.2.1:321")));
        let edges = b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n";
        assert_eq!(decode(edges), whole(edges, proxied("0.0.0.0:0", "255.255.255.255:65535")));
    }

    #[test]
    fn v1_tcp6() {
        for line in [
            &b"PROXY TCP6 fc:00:00:00:1:2:3:4 fc:00:00:00:4:3:2:1 123 321\r\n"[..],
            b"PROXY TCP6 FC:00:00:00:1:2:3:4 FC:00:00:00:4:3:2:1 123 321\r\n",
        ] {
            assert_eq!(decode(line), whole(line, proxied("[fc::1:2:3:4]:123", "[fc::4:3:2:1]:321")));
        }
    }

    #[test]
    fn v1_tcp6_with_mapped_ipv4_gives_ipv4() {
        for line in [
            &b"PROXY TCP6 ::ffff:1.2.3.4 ::ffff:4.3.2.1 123 321\r\n"[..],
            b"PROXY TCP6 ::FFFF:1.2.3.4 ::FFFF:4.3.2.1 123 321\r\n",
        ] {
            assert_eq!(decode(line), whole(line, proxied("1.2.3.4:123", "4.3.2.1:321")));
        }
    }

    #[test]
    fn v1_unknown_is_local() {
        for line in [&b"PROXY UNKNOWN\r\n"[..], b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", b"PROXY UNKNOWN \r\n"] {
            assert_eq!(decode(line), whole(line, ProxyHeader::Local));
        }
        assert_eq!(decode(b"PROXY UNKNOWNX\r\n"), invalid(BAD_PROTOCOL));
    }

    #[test]
    fn v1_address_of_the_wrong_family() {
        let cases: [(&[u8], &str); 5] = [
            (b"PROXY TCP6 1.2.3.4 4.3.2.1 123 321\r\n", "bad or missing source address"),
            (b"PROXY TCP6 fc:00:00:00:1:2:3:4 4.3.2.1 123 321\r\n", "bad or missing destination address"),
            (b"PROXY TCP4 ::ffff:1.2.3.4 ::ffff:4.3.2.1 123 321\r\n", "bad or missing source address"),
            (b"PROXY TCP4 1.2.3.4 ::ffff:4.3.2.1 123 321\r\n", "bad or missing destination address"),
            // Postfix reads these octets as decimal; C's inet_aton as octal: refuse the ambiguity.
            (b"PROXY TCP4 01.02.03.04 04.03.02.01 123 321\r\n", "bad or missing source address"),
        ];
        for (line, reason) in cases {
            assert_eq!(decode(line), invalid(reason), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn v1_bad_ports() {
        let cases: [(&[u8], &str); 7] = [
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 123456 321\r\n", "bad or missing source port"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 123 654321\r\n", "bad or missing destination port"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 65536 321\r\n", "bad or missing source port"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 0123 321\r\n", "bad or missing source port"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 123 0321\r\n", "bad or missing destination port"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 +123 321\r\n", "bad or missing source port"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 -1 321\r\n", "bad or missing source port"),
        ];
        for (line, reason) in cases {
            assert_eq!(decode(line), invalid(reason), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn v1_missing_and_extra_fields() {
        let cases: [(&[u8], &str); 12] = [
            (b"PROXY TCP6 fc:00:00:00:1:2:3:4 fc:00:00:00:4:3:2:1 123\r\n", "bad or missing destination port"),
            (b"PROXY TCP6 fc:00:00:00:1:2:3:4 fc:00:00:00:4:3:2:1\r\n", "bad or missing source port"),
            (b"PROXY TCP6 fc:00:00:00:1:2:3:4\r\n", "bad or missing destination address"),
            (b"PROXY TCP6\r\n", "bad or missing source address"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 123\r\n", "bad or missing destination port"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1\r\n", "bad or missing source port"),
            (b"PROXY TCP4 1.2.3.4\r\n", "bad or missing destination address"),
            (b"PROXY TCP4\r\n", "bad or missing source address"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 123 321 9\r\n", EXTRA_FIELD),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 123 321 \r\n", EXTRA_FIELD),
            (b"PROXY TCP4  1.2.3.4 4.3.2.1 123 321\r\n", "bad or missing source address"),
            (b"PROXY TCP4 1.2.3.4 4.3.2.1 123  321\r\n", "bad or missing destination port"),
        ];
        for (line, reason) in cases {
            assert_eq!(decode(line), invalid(reason), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn v1_other_malformed_lines() {
        assert_eq!(decode(b"PROXY BLAH\r\n"), invalid(BAD_PROTOCOL));
        assert_eq!(decode(b"PROXY BLAH 1.2.3.4"), invalid(BAD_PROTOCOL));
        assert_eq!(decode(b"PROXY tcp4 1.2.3.4 4.3.2.1 123 321\r\n"), invalid(BAD_PROTOCOL));
        assert_eq!(decode(b"PROXY\r\n"), invalid(NOT_A_HEADER));
        assert_eq!(decode(b"PROXY\n"), invalid(NOT_A_HEADER));
        assert_eq!(decode(b"P\r\xff"), invalid(NOT_A_HEADER));
        assert_eq!(decode(b"BLAH\r\n"), invalid(NOT_A_HEADER));
        assert_eq!(decode(b"\n"), invalid(NOT_A_HEADER));
        assert_eq!(decode(b"proxy TCP4 1.2.3.4 4.3.2.1 123 321\r\n"), invalid(NOT_A_HEADER));
        assert_eq!(decode(b"PROXY TCP4 1.2.3.4 4.3.2.1 123 321\n"), invalid("line ends in a bare LF"));
        assert_eq!(decode(b"PROXY TCP4 1.2.3.4 4.3.2.1 123 321\rX"), invalid("CR not followed by LF"));
        // What the first bytes decided stands once the line ends.
        assert_eq!(decode(b"PRXOY \0\n"), invalid(NOT_A_HEADER));
        assert_eq!(decode(b"PROXY TCP4 1.2.3.4O  4.3.2.1 1 2\r\n"), invalid(TCP_FIELD_ERRORS[0]));
    }

    #[test]
    fn v1_one_byte_appended_or_removed() {
        let line = b"PROXY TCP4 1.2.3.4 4.3.2.1 123 321\r\n";
        let appended = [&line[..], b"X"].concat();
        assert_eq!(decode(&appended), whole(line, proxied("1.2.3.4:123", "4.3.2.1:321")));
        assert_eq!(decode(&line[..line.len() - 1]), ProxyDecode::Incomplete);
        let without_cr = [&line[..line.len() - 2], b"\n"].concat();
        assert_invalid(&without_cr);
        let port_grown = b"PROXY TCP4 1.2.3.4 4.3.2.1 123 3210\r\n";
        assert_eq!(decode(port_grown), whole(port_grown, proxied("1.2.3.4:123", "4.3.2.1:3210")));
        assert_invalid(b"PROXY TCP4 1.2.3.4 4.3.2.1 123 65539\r\n");
    }

    #[test]
    fn v1_length_limit() {
        let longest_tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
            ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest_tcp6.len(), 104);
        assert!(matches!(decode(longest_tcp6), ProxyDecode::Header { .. }));
        let unknown_of_len = |len: usize| [&b"PROXY UNKNOWN "[..], &vec![b'x'; len - 16], b"\r\n"].concat();
        assert_eq!(decode(&unknown_of_len(107)), ProxyDecode::Header { header: ProxyHeader::Local, consumed: 107 });
        assert_invalid(&unknown_of_len(108));
        assert_eq!(decode(&unknown_of_len(107)[..106]), ProxyDecode::Incomplete);
        assert_eq!(decode(&unknown_of_len(108)[..105]), ProxyDecode::Incomplete);
        assert_eq!(decode(&unknown_of_len(108)[..106]), invalid("no CRLF within 107 bytes"));
        assert_invalid(&[b'P'; 107]);
    }

    #[test]
    fn v1_rejected_before_the_line_ends() {
        for start in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"EHLO x\r\n",
            b"\x16\x03\x01\x02\x00",
            b"PROXY TCP7",
            b"PROXY TCP4 1.2.3.4.5",
            b"PROXY TCP4 256",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0123",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
            b"PROXY TCP6 1.2",
            b"PROXY TCP6 1:2:3:4:5:6:7:8:",
            b"PROXY TCP6 12345",
            b"PROXY TCP4 1.2.3.4\r",
        ] {
            assert_invalid(start);
        }
    }

    #[test]
    fn v1_prefixes_wait_for_more() {
        for start in [
            &b""[..],
            b"P",
            b"PROX",
            b"PROXY ",
            b"PROXY T",
            b"PROXY UNK",
            b"PROXY TCP6 ::ffff:1.",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0",
        ] {
            assert_eq!(decode(start), ProxyDecode::Incomplete, "{}", String::from_utf8_lossy(start));
        }
    }

    #[test]
    fn v2_tcp4() {
        let header = v2(0x21, 0x11, &tcp4_block());
        assert_eq!(decode(&header), whole(&header, proxied("192.0.2.1:1234", "198.51.100.2:25")));
    }

    #[test]
    fn v2_tcp6() {
        let block = tcp6_block("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        let header = v2(0x21, 0x21, &block);
        assert_eq!(decode(&header), whole(&header, proxied("[2001:db8::1]:123", "[2001:db8::2]:321")));
        let mapped = tcp6_block("::ffff:192.0.2.1".parse().unwrap(), "::1".parse().unwrap());
        let header = v2(0x21, 0x21, &mapped);
        assert_eq!(decode(&header), whole(&header, proxied("192.0.2.1:123", "[::1]:321")));
    }

    #[test]
    fn v2_local_ignores_the_addresses() {
        for header in [v2(0x20, 0x00, b""), v2(0x20, 0x11, &tcp4_block()), v2(0x20, 0x12, b"xy"), v2(0x20, 0xFF, b"")] {
            assert_eq!(decode(&header), whole(&header, ProxyHeader::Local));
        }
    }

    #[test]
    fn v2_unspec_and_unix_are_local() {
        for header in
            [v2(0x21, 0x00, b""), v2(0x21, 0x00, b"abcde"), v2(0x21, 0x31, &[0; 216]), v2(0x21, 0x32, &[7; 216])]
        {
            assert_eq!(decode(&header), whole(&header, ProxyHeader::Local));
        }
    }

    #[test]
    fn v2_refusals() {
        let mut bad_signature = v2(0x21, 0x11, &tcp4_block());
        bad_signature[7] = b'X';
        assert_eq!(decode(&bad_signature), invalid(NOT_A_HEADER));
        assert_eq!(decode(&v2(0x11, 0x11, &tcp4_block())), invalid("unsupported PROXY protocol version 1"));
        assert_eq!(decode(&v2(0x31, 0x11, &tcp4_block())), invalid("unsupported PROXY protocol version 3"));
        assert_eq!(decode(&v2(0x2F, 0x11, &tcp4_block())), invalid("unknown PROXY protocol v2 command 0xF"));
        assert_eq!(decode(&v2(0x21, 0x12, &tcp4_block())), invalid("UDP (family 0x12) is not supported"));
        assert_invalid(&v2(0x21, 0x22, &[0; 36]));
        for family in [0x01, 0x10, 0x13, 0x41] {
            assert_eq!(
                decode(&v2(0x21, family, &tcp4_block())),
                invalid(&format!("unknown address family {family:#04X}"))
            );
        }
        assert_eq!(decode(&v2(0x21, 0x11, &tcp4_block()[..8])), invalid(SHORT_ADDRESSES));
        assert_eq!(decode(&v2(0x21, 0x21, &[0; 35])), invalid(SHORT_ADDRESSES));
    }

    #[test]
    fn v2_rejected_as_soon_as_the_fixed_part_says_so() {
        assert_invalid(&v2(0x11, 0x11, b"")[..13]);
        assert_invalid(&v2(0x2F, 0x11, b"")[..13]);
        assert_invalid(&v2(0x21, 0x22, b"")[..14]);
        assert_invalid(&v2_declaring(0x21, 0x11, 8, b""));
        assert_eq!(decode(&v2_declaring(0x21, 0x11, 12, b"")), ProxyDecode::Incomplete);
        assert_eq!(decode(&v2_declaring(0x21, 0x11, 0xFFFF, &[0; 1000])), ProxyDecode::Incomplete);
    }

    #[test]
    fn v2_tlvs() {
        let with_authority = [tcp4_block(), authority_tlv("mail.example"), vec![0x04, 0, 0]].concat();
        let header = v2(0x21, 0x11, &with_authority);
        assert_eq!(decode(&header), whole(&header, proxied("192.0.2.1:1234", "198.51.100.2:25")));
        let overrunning = [tcp4_block(), vec![0x02, 0, 5, b'a']].concat();
        assert_eq!(decode(&v2(0x21, 0x11, &overrunning)), invalid(TRUNCATED_TLV));
        for stray in [&[0x02][..], &[0x02, 0]] {
            assert_eq!(decode(&v2(0x21, 0x11, &[&tcp4_block(), stray].concat())), invalid(TRUNCATED_TLV));
        }
    }

    #[test]
    fn v2_bytes_after_the_header_are_not_consumed() {
        let header = v2(0x21, 0x11, &tcp4_block());
        let input = [&header[..], b"EHLO x\r\n"].concat();
        assert_eq!(decode(&input), whole(&header, proxied("192.0.2.1:1234", "198.51.100.2:25")));
    }

    fn valid_headers() -> Vec<Vec<u8>> {
        let v1: [&[u8]; 9] = [
            b"PROXY TCP4 1.2.3.4 4.3.2.1 123 321\r\n",
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            b"PROXY TCP6 fc:00:00:00:1:2:3:4 FC:00:00:00:4:3:2:1 123 321\r\n",
            b"PROXY TCP6 ::ffff:1.2.3.4 ::ffff:4.3.2.1 123 321\r\n",
            b"PROXY TCP6 :: 1:2:3:4:5:6:1.2.3.4 1 2\r\n",
            b"PROXY TCP6 1:: 1:2:3:4:5:6:7:8 1 2\r\n",
            b"PROXY TCP6 2001:db8::1 1::2:3:4:5:6:7 1 2\r\n",
            b"PROXY UNKNOWN\r\n",
            b"PROXY UNKNOWN whatever 1 2 3\r\n",
        ];
        let tcp6 = tcp6_block("2001:db8::1".parse().unwrap(), "::ffff:1.2.3.4".parse().unwrap());
        let v2_headers = [
            v2(0x21, 0x11, &tcp4_block()),
            v2(0x21, 0x21, &tcp6),
            v2(0x21, 0x11, &[tcp4_block(), authority_tlv("mx.example")].concat()),
            v2(0x20, 0x00, b""),
            v2(0x21, 0x31, &[0; 216]),
        ];
        v1.iter().map(|line| line.to_vec()).chain(v2_headers).collect()
    }

    #[test]
    fn every_strict_prefix_of_a_header_is_incomplete() {
        for header in valid_headers() {
            let input = [&header[..], b"EHLO x\r\n"].concat();
            for end in 0..header.len() {
                assert_eq!(
                    decode(&input[..end]),
                    ProxyDecode::Incomplete,
                    "{:?}",
                    String::from_utf8_lossy(&input[..end])
                );
            }
            for end in header.len()..=input.len() {
                let ProxyDecode::Header { consumed, .. } = decode(&input[..end]) else {
                    panic!("{:?} is not a header", String::from_utf8_lossy(&input[..end]));
                };
                assert_eq!(consumed, header.len());
            }
        }
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

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    /// Random bytes, or a valid header with bytes changed, cut or added:
    /// mostly garbage would be rejected at the first byte.
    fn random_input(random: &mut Random, headers: &[Vec<u8>]) -> Vec<u8> {
        let mut input = match random.below(3) {
            0 => (0..random.below(64)).map(|_| random.byte()).collect(),
            _ => headers[random.below(headers.len())].clone(),
        };
        for _ in 0..random.below(4) {
            let at = random.below(input.len() + 1);
            match random.below(3) {
                0 if at < input.len() => input[at] = random.byte(),
                1 => input.insert(at, b" .:0123456789\r\nf"[random.below(16)]),
                _ => input.truncate(at),
            }
        }
        input
    }

    #[test]
    fn random_inputs_never_panic_and_a_verdict_never_changes() {
        let headers = valid_headers();
        let mut random = Random(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let input = random_input(&mut random, &headers);
            let mut verdict = None;
            for end in 0..=input.len() {
                let outcome = decode(&input[..end]);
                if let ProxyDecode::Header { consumed, .. } = outcome {
                    assert!(consumed <= end);
                }
                match (&verdict, &outcome) {
                    (_, ProxyDecode::Incomplete) => assert!(verdict.is_none(), "{input:?} went back to Incomplete"),
                    (None, _) => verdict = Some(outcome),
                    (Some(ProxyDecode::Invalid(_)), ProxyDecode::Invalid(_)) => {}
                    (Some(earlier), later) => assert_eq!(earlier, later, "{input:?}"),
                }
            }
        }
    }
}
