//! Postfix's XCLIENT.

use super::*;

#[tokio::test]
async fn xclient_starts_the_session_over_for_the_real_client() {
    let params = json!({"peer": {"192.0.2.10": {"allow_xclient": true}, "10.1.1.1": {"hostname": "real.test"}}});
    let (harness, seen) = recording_clients(params);
    let mut client = greeted(&harness, CLIENT).await;
    let (_, extensions) = client.command("EHLO proxy.test").await;
    assert!(extensions.iter().any(|e| e.starts_with("XCLIENT ")), "{extensions:?}");
    let (code, text) = client.command("XCLIENT ADDR=10.1.1.1 PORT=5555 LOGIN=someone").await;
    assert_eq!((code, text[0].as_str()), (220, "real.test ESMTP kumo_listener"));
    assert_eq!(seen.take(), ["192.0.2.10:40000", "10.1.1.1:5555"]);
    // The real client's parameters: no XCLIENT for it; LOGIN lets it relay.
    client.command("EHLO real-client.test").await;
    assert_eq!(client.code("XCLIENT ADDR=10.2.2.2").await, (550, "5.7.0 insufficient authorization".into()));
    client.command("MAIL FROM:<a@b.test>").await;
    assert_eq!(client.code("RCPT TO:<x@anywhere.test>").await.0, 250);

    let mut other = greeted(&harness, "192.0.2.99:1").await;
    assert_eq!(other.code("XCLIENT ADDR=10.1.1.1").await, (550, "insufficient authorization".into()));
}

#[tokio::test]
async fn talking_before_the_xclient_greeting_loses_synchronization() {
    let params = json!({"hostname": "mx.test", "peer": {"192.0.2.10": {"allow_xclient": true}}});
    let (harness, seen) = recording_clients(params);
    let mut client = greeted(&harness, CLIENT).await;
    client.command("EHLO proxy.test").await;
    client.send(b"XCLIENT ADDR=10.1.1.1\r\nEHLO early\r\n").await;
    assert_eq!(client.reply().await, (554, vec!["5.5.0 mx.test Error: SMTP protocol synchronization".into()]));
    client.expect_closed().await;
    assert_eq!(seen.take(), ["192.0.2.10:40000", "10.1.1.1:40000"]);
}
