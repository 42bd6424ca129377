//! `decode_proxy_header` on arbitrary bytes and on every prefix of them, as a
//! connection receives them: never panics; a `Header` consumes at most the
//! input (and at least a whole v1 line or v2 fixed part); once a prefix gives
//! `Header` or `Invalid`, every longer prefix gives the same answer, so that
//! reading more never changes a decision; addresses are never IPv4-mapped
//! IPv6 (those come back as IPv4); `Invalid` has a printable reason.

#![no_main]

use kumo_listener::protocol::proxy::{decode_proxy_header, ProxyDecode, ProxyHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut decided: Option<(usize, ProxyDecode)> = None;
    for len in 0..=input.len() {
        let prefix = &input[..len];
        let decoded = decode_proxy_header(prefix);
        check_one(prefix, &decoded);
        match &decided {
            Some((at, first)) => assert_eq!(
                &decoded, first,
                "{len} bytes decode differently from the first {at}: {:?}",
                String::from_utf8_lossy(prefix)
            ),
            None if decoded != ProxyDecode::Incomplete => decided = Some((len, decoded)),
            None => {}
        }
    }
});

fn check_one(input: &[u8], decoded: &ProxyDecode) {
    match decoded {
        ProxyDecode::Header { header, consumed } => {
            assert!(*consumed <= input.len(), "consumed {consumed} of {}", input.len());
            let header_bytes = &input[..*consumed];
            match input[0] {
                b'P' => {
                    assert!(header_bytes.starts_with(b"PROXY ") && header_bytes.ends_with(b"\r\n"), "{header_bytes:?}");
                    assert!(*consumed <= 107, "v1 header of {consumed} bytes");
                }
                b'\r' => assert!(*consumed >= 16, "v2 header of {consumed} bytes"),
                other => panic!("a header starting with {other:#04X}"),
            }
            if let ProxyHeader::Proxied { source, destination } = header {
                for address in [source.ip(), destination.ip()] {
                    assert_eq!(address, address.to_canonical(), "IPv4-mapped address {address}");
                }
            }
        }
        ProxyDecode::Incomplete => {}
        ProxyDecode::Invalid(reason) => {
            assert!(!reason.is_empty() && !reason.chars().any(char::is_control), "reason {reason:?}");
        }
    }
}
