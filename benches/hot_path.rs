//! The pure hot paths, one group each: command parsing, DATA framing with
//! dot-unstuffing, the parameter merge, and longest-prefix lookup.
//! Run with `cargo bench`; issue targets are in the README's Performance section.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kumo_listener::cidr::{parse_cidr, CidrMap};
use kumo_listener::params::{parse_listener_config, parse_overrides, Params};
use kumo_listener::protocol::framing::{DataFramer, DataLimits, LineEndings};
use kumo_listener::protocol::parser::parse_command;
use serde_json::json;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

const COMMANDS: [&[u8]; 6] = [
    b"EHLO client.example.com",
    b"MAIL FROM:<sender@example.com> SIZE=1024 BODY=8BITMIME",
    b"RCPT TO:<recipient@example.net>",
    b"RCPT TO:<\"quoted local\"@[192.0.2.1]>",
    b"DATA",
    b"QUIT",
];

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parser");
    group.throughput(Throughput::Elements(COMMANDS.len() as u64));
    group.bench_function("typical transaction", |b| {
        b.iter(|| COMMANDS.iter().for_each(|line| drop(black_box(parse_command(black_box(line))))))
    });
    group.finish();
}

/// A 1 MiB message of 76-byte lines, one in ten dot-stuffed, plus the terminator.
fn stuffed_message() -> Vec<u8> {
    let mut data = Vec::with_capacity(1 << 20);
    let mut number = 0;
    while data.len() < (1 << 20) {
        let stuffing = if number % 10 == 0 { ".." } else { "" };
        data.extend_from_slice(format!("{stuffing}{:074}\r\n", number).as_bytes());
        number += 1;
    }
    data.extend_from_slice(b".\r\n");
    data
}

fn framing(c: &mut Criterion) {
    let input = stuffed_message();
    let limits = DataLimits { max_message_size: 64 << 20, max_line_length: 998, line_endings: LineEndings::Deny };
    let mut group = c.benchmark_group("data framing");
    group.throughput(Throughput::Bytes(input.len() as u64));
    let mut body = Vec::with_capacity(input.len());
    group.bench_function("1 MiB, 10% stuffed lines", |b| {
        b.iter(|| {
            body.clear();
            let fed = DataFramer::new(limits).feed(black_box(&input), &mut body);
            assert!(fed.done);
        })
    });
    group.finish();
}

fn merging(c: &mut Criterion) {
    let base = parse_listener_config(&json!({
        "listen": "0.0.0.0:25",
        "hostname": "mx.example.net",
        "relay_hosts": ["127.0.0.1", "::1"],
        "peer": {"192.168.1.0/24": {"banner": "Welcome LAN!", "meta": {"trusted": true}}},
    }))
    .unwrap()
    .params;
    let dynamic = parse_overrides(
        &json!({
            "via": {
                "10.0.0.1": {"hostname": "mx.example-customer.com"},
                "10.0.0.2": {"hostname": "mx.other-customer.com", "banner": "other customer's MX"},
            }
        }),
        "",
    )
    .unwrap();
    let remote = IpAddr::from([192, 168, 1, 7]);
    let local = IpAddr::from([10, 0, 0, 2]);
    c.bench_function("merge: seed example, base → peer → via → dynamic", |b| {
        b.iter(|| {
            let mut params = Params::default();
            params.apply(black_box(&base), remote, local);
            params.apply(black_box(&dynamic), remote, local);
            params
        })
    });
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("via lookup");
    for size in [1u32, 10, 100, 10_000, 100_000] {
        let mut map = CidrMap::new();
        for index in 0..size {
            let ip = Ipv4Addr::from(0x0a00_0000 + index * 7);
            map.insert(parse_cidr(&ip.to_string()).unwrap(), index);
        }
        map.insert(parse_cidr("10.0.0.0/8").unwrap(), u32::MAX);
        let probes: Vec<IpAddr> =
            (0..1024u32).map(|i| Ipv4Addr::from(0x0a00_0000 + i * 5 * size / 1024).into()).collect();
        group.throughput(Throughput::Elements(probes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &probes, |b, probes| {
            b.iter(|| probes.iter().filter_map(|ip| map.longest_match(*ip)).count())
        });
    }
    group.finish();
}

criterion_group!(benches, parsing, framing, merging, lookup);
criterion_main!(benches);
