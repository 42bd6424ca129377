//! RFC 3030 CHUNKING: BDAT.

use super::*;

#[tokio::test]
async fn bdat_chunks_are_read_exactly_even_when_pipelined_with_commands() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"], "hostname": "mx.test"}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    // The chunks hold what would be commands, a DATA terminator and a dot line.
    let first = b"Subject: x\r\n\r\n.\r\nRSET\r\n";
    let second = b"QUIT\r\n..\r\n";
    let mut pipelined = b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\n".to_vec();
    pipelined.extend_from_slice(format!("BDAT {}\r\n", first.len()).as_bytes());
    pipelined.extend_from_slice(first);
    pipelined.extend_from_slice(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    pipelined.extend_from_slice(second);
    pipelined.extend_from_slice(b"NOOP\r\n");
    client.send(&pipelined).await;
    let replies = codes_of(&mut client, 5).await;
    assert_eq!(
        replies[..3],
        [(250, "2.1.0 OK".into()), (250, "2.1.5 OK".into()), (250, "2.0.0 23 octets received".into())]
    );
    assert!(replies[3].0 == 250 && replies[3].1.starts_with("2.0.0 OK ids="), "{replies:?}");
    assert_eq!(replies[4], (250, "2.0.0 OK".into()));
    assert_eq!(seen.take(), ["Subject: x\r\n\r\n.\r\nRSET\r\nQUIT\r\n..\r\n"]);
    // BDAT 0 LAST ends a message; a later transaction may use DATA.
    client.send(b"MAIL FROM:<>\r\nRCPT TO:<x@d.test>\r\nBDAT 3\r\nabcBDAT 0 LAST\r\n").await;
    let replies = codes_of(&mut client, 4).await;
    assert_eq!(replies[2], (250, "2.0.0 3 octets received".into()));
    assert_eq!(replies[3].0, 250);
    assert_eq!(seen.take(), ["abc"]);
    assert_eq!(client.code("QUIT").await.0, 221);
}

#[tokio::test]
async fn bdat_out_of_sequence_is_refused_and_its_chunk_discarded() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"BDAT 6 LAST\r\nNOOP\r\nRSET\r\n").await;
    assert_eq!(client.reply().await, (503, vec!["5.5.1 need MAIL command first".into()]));
    assert_eq!(client.reply().await, (250, vec!["2.0.0 OK".into()]), "only RSET was a command");
    client.send(b"MAIL FROM:<a@b.test>\r\nBDAT 4\r\nNOOPRCPT TO:<x@d.test>\r\nBDAT 2\r\nabDATA\r\n").await;
    let replies = codes_of(&mut client, 5).await;
    assert_eq!(replies[1], (503, "5.5.1 need RCPT command first".into()));
    assert_eq!(replies[3], (250, "2.0.0 2 octets received".into()));
    // RFC 3030 §2: no DATA after BDAT in a transaction.
    assert_eq!(replies[4], (503, "5.5.1 DATA after BDAT, send RSET".into()));
    assert_eq!(client.code("RSET").await.0, 250);
    // RFC 3030 §3: BINARYMIME only with BDAT.
    client.send(b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@d.test>\r\nDATA\r\n").await;
    let replies = codes_of(&mut client, 3).await;
    assert_eq!(replies[2], (503, "5.5.1 BODY=BINARYMIME needs BDAT, not DATA".into()));
    let binary = b"\0\x80\xff\r\r\n\n.\r\n";
    client.send(format!("BDAT {} LAST\r\n", binary.len()).as_bytes()).await;
    client.send(binary).await;
    assert_eq!(client.reply().await.0, 250);
    assert_eq!(seen.take(), [String::from_utf8_lossy(binary)]);
    // A BDAT after LAST has no transaction.
    assert_eq!(client.code("BDAT 0 LAST").await.0, 503);
}

#[tokio::test]
async fn a_message_too_big_is_refused_at_its_chunk_and_discarded_until_last() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"], "max_message_size": 10}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 6\r\n123456BDAT 5\r\n12345BDAT 2\r\n12").await;
    client.send(b"BDAT 1 LAST\r\n1MAIL FROM:<a@b.test>\r\n").await;
    let too_big = (552, "5.3.4 message size exceeds fixed maximum message size".into());
    let replies = codes_of(&mut client, 7).await;
    assert_eq!(replies[2], (250, "2.0.0 6 octets received".into()));
    assert_eq!(replies[3..6], [too_big.clone(), too_big.clone(), too_big]);
    assert_eq!(replies[6], (250, "2.1.0 OK".into()), "LAST ended the refused transaction");
    // SIZE= over the limit is refused up front; the limit counts every chunk.
    assert_eq!(client.code("RSET").await.0, 250);
    assert_eq!(client.code("MAIL FROM:<a@b.test> SIZE=11").await.0, 552);
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 5\r\n12345BDAT 5 LAST\r\n12345").await;
    assert_eq!(codes_of(&mut client, 4).await[3].0, 250);
    assert_eq!(seen.take(), ["1234512345"]);
}

#[tokio::test]
async fn text_chunks_follow_invalid_line_endings_binarymime_does_not() {
    for (mode, expected) in [("Deny", None), ("Allow", Some("a\nb")), ("Fix", Some("a\r\nb"))] {
        let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"], "invalid_line_endings": mode}));
        let mut client = greeted(&harness, CLIENT).await;
        client.command("EHLO client.test").await;
        client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 3 LAST\r\na\nb").await;
        let reply = codes_of(&mut client, 3).await.remove(2);
        match expected {
            None => assert_eq!(reply, (550, "5.6.0 message contains a bare CR or LF; lines must end in CRLF".into())),
            Some(body) => assert_eq!((reply.0, seen.take()), (250, vec![body.to_string()]), "{mode}"),
        }
        client.send(b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@d.test>\r\nBDAT 3 LAST\r\na\nb").await;
        assert_eq!(codes_of(&mut client, 3).await[2].0, 250, "{mode}");
        assert_eq!(seen.take(), ["a\nb"], "{mode}");
    }
}

#[tokio::test]
async fn a_malformed_bdat_ends_the_session() {
    let harness = plain(json!({"hostname": "mx.test"}));
    for line in ["BDAT", "BDAT 12x", "BDAT 5 FIRST", "BDAT -1 LAST"] {
        let mut client = greeted(&harness, CLIENT).await;
        client.command("EHLO client.test").await;
        assert_eq!(client.command(line).await, (521, vec!["5.5.4 mx.test syntax: BDAT size [LAST]".into()]), "{line}");
        client.expect_closed().await;
    }
}

#[tokio::test]
async fn a_chunk_cut_short_by_the_client_stores_nothing() {
    let (harness, seen) = recording_bodies(json!({"relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 100 LAST\r\nonly a part").await;
    assert_eq!(codes_of(&mut client, 2).await.len(), 2);
    client.stream.shutdown().await.unwrap();
    client.expect_closed().await;
    // As Postfix counts it, the BDAT cut short did not succeed.
    let disconnected = || {
        let logs = harness.logs();
        logs.iter().any(|line| line.starts_with("lost connection after BDAT from"))
            && logs.iter().any(|line| {
                line.contains("disconnect from")
                    && line.contains(" bdat=0/1 ")
                    && line.ends_with(" reason=client-closed")
            })
    };
    for _ in 0..100 {
        if disconnected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(disconnected(), "{:?}", harness.logs());
    assert!(seen.take().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_chunk_must_arrive_at_data_speed() {
    let harness = plain(json!({"hostname": "mx.test", "client_timeout": 5, "relay_hosts": ["192.0.2.0/24"]}));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nBDAT 10\r\nabc").await;
    assert_eq!(codes_of(&mut client, 2).await.len(), 2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(client.reply().await, (421, vec!["4.3.2 mx.test idle too long, closing connection".into()]));
    client.expect_closed().await;
}

#[tokio::test(start_paused = true)]
async fn chunks_may_take_no_longer_than_max_data_duration_from_the_first() {
    let harness = plain(json!({
        "hostname": "mx.test", "relay_hosts": ["192.0.2.0/24"], "client_timeout": 60, "max_data_duration": "30s",
    }));
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    assert_eq!(client.code("MAIL FROM:<a@b.test>").await.0, 250);
    assert_eq!(client.code("RCPT TO:<x@d.test>").await.0, 250);
    // Each chunk comes in time for client_timeout; together they are too slow.
    for _ in 0..3 {
        client.send(b"BDAT 3\r\nabc").await;
        assert_eq!(client.reply().await.0, 250);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    assert_eq!(client.reply().await, (421, vec!["4.4.2 mx.test data timeout, closing connection".into()]));
    client.expect_closed().await;
    // A chunk whose bytes trickle is cut off at the same point.
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO client.test").await;
    client.command("MAIL FROM:<a@b.test>").await;
    client.command("RCPT TO:<x@d.test>").await;
    client.send(b"BDAT 100 LAST\r\n").await;
    for _ in 0..29 {
        client.send(b"x").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.reply().await, (421, vec!["4.4.2 mx.test data timeout, closing connection".into()]));
}
