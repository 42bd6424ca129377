//! Messages as handed to policy and sinks: identifiers, trace headers and
//! splitting a transaction by `batch_handling`. No sockets or files of its
//! own, but not pure: ids read the clock and the process id and count in a
//! process-wide counter, and the `Received:` header's date is local time
//! (chrono reads the system's time zone for it).

use crate::body::Body;
use crate::escape;
use crate::meta::MetaStore;
use crate::params::BatchHandling;
use crate::protocol::parser::Mailbox;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// One message: the whole transaction (before splitting) or one split part.
#[derive(Debug)]
pub struct Message {
    pub id: String,
    /// The reverse path; the null sender `<>` has an empty local part and domain.
    pub sender: Mailbox,
    pub recipients: Vec<Mailbox>,
    /// Trace headers of this message alone, written before `data`: a split
    /// part's supplemental header and its `Received:` header when the
    /// transaction had several recipients. Often empty.
    pub head: Bytes,
    /// Header fields policy prepended (`check_authentication(...,
    /// add_header=True)`), written before `head`; a split part starts with
    /// those of its transaction.
    prepended: Mutex<Bytes>,
    /// The message as received (after a `Received:` header when the
    /// transaction had one recipient). Split parts share the transaction's
    /// bytes: no part copies the body.
    pub data: Body,
    pub meta: MetaStore,
}

impl Message {
    pub fn new(id: String, sender: Mailbox, recipients: Vec<Mailbox>, data: impl Into<Body>) -> Arc<Self> {
        Self::with_head(id, sender, recipients, Bytes::new(), data)
    }

    pub fn with_head(
        id: String,
        sender: Mailbox,
        recipients: Vec<Mailbox>,
        head: Bytes,
        data: impl Into<Body>,
    ) -> Arc<Self> {
        let prepended = Mutex::default();
        Arc::new(Self { id, sender, recipients, head, prepended, data: data.into(), meta: MetaStore::new() })
    }

    fn prepended(&self) -> Bytes {
        self.prepended.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Put `field` (CRLF-terminated) at the top of the message.
    pub fn prepend(&self, field: &str) {
        let mut prepended = self.prepended.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut both = Vec::with_capacity(field.len() + prepended.len());
        both.extend_from_slice(field.as_bytes());
        both.extend_from_slice(&prepended);
        *prepended = Bytes::from(both);
    }

    /// What is written before `data`: the fields policy prepended, then `head`.
    pub fn full_head(&self) -> Bytes {
        let prepended = self.prepended();
        if prepended.is_empty() {
            return self.head.clone();
        }
        Bytes::from([prepended.as_ref(), self.head.as_ref()].concat())
    }

    /// The whole message, trace headers first, as policy sees it.
    pub fn len(&self) -> usize {
        self.prepended().len() + self.head.len() + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write `head` then `data` into `out`, of [`Self::len`] bytes (reading
    /// `data` from its file if it was spilled).
    pub fn read_into(&self, out: &mut [u8]) -> std::io::Result<()> {
        let full_head = self.full_head();
        let (head, data) = out.split_at_mut(full_head.len());
        head.copy_from_slice(&full_head);
        self.data.read_into(data)
    }
}

/// A process-unique, time-ordered identifier of 32 hex digits.
pub fn new_message_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Asked once: a system call per message otherwise.
    static PROCESS_ID: LazyLock<u32> = LazyLock::new(std::process::id);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
    let sequence = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}{:08x}{:08x}", *PROCESS_ID, sequence as u32)
}

/// Now as an RFC 2822 date in local time, formatted once a second per thread.
fn rfc2822_now() -> String {
    thread_local! {
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let second = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    LAST.with_borrow_mut(|(formatted_at, date)| {
        if *formatted_at != second {
            *formatted_at = second;
            *date = chrono::Local::now().to_rfc2822();
        }
        date.clone()
    })
}

/// KumoMTA's supplemental trace header, added to each split part so that
/// bounces and feedback reports can be tied back to it.
pub struct Supplemental<'a> {
    pub header_name: &'a str,
    pub include_meta_names: &'a [String],
}

/// How a transaction's recipients are grouped into the parts it is split
/// into: the part of each recipient, in RCPT order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grouping(Vec<usize>);

impl Grouping {
    /// As `batch_handling` says: a part per recipient, or per domain
    /// (case-insensitively, parts in order of first appearance).
    pub fn by(handling: BatchHandling, recipients: &[Mailbox]) -> Self {
        match handling {
            BatchHandling::BifurcateAlways => Self((0..recipients.len()).collect()),
            BatchHandling::BatchByDomain => {
                let mut domains: Vec<&str> = Vec::new();
                let parts = recipients.iter().map(|recipient| {
                    let seen = domains.iter().position(|domain| domain.eq_ignore_ascii_case(&recipient.domain));
                    seen.unwrap_or_else(|| {
                        domains.push(&recipient.domain);
                        domains.len() - 1
                    })
                });
                Self(parts.collect())
            }
        }
    }

    /// As `smtp_server_split_transaction` returned it: groups of addresses,
    /// each recipient in exactly one (a recipient given twice, twice).
    pub fn from_groups(recipients: &[Mailbox], groups: &[Vec<String>]) -> Result<Self, String> {
        let mut part_of: Vec<Option<usize>> = vec![None; recipients.len()];
        let groups = groups.iter().filter(|group| !group.is_empty());
        for (part, group) in groups.enumerate() {
            for address in group {
                let free = recipients
                    .iter()
                    .zip(&part_of)
                    .position(|(recipient, placed)| placed.is_none() && recipient.to_string() == *address);
                let index =
                    free.ok_or_else(|| format!("{address:?} is not a recipient of the message, or is in two groups"))?;
                part_of[index] = Some(part);
            }
        }
        part_of
            .iter()
            .zip(recipients)
            .map(|(part, recipient)| {
                part.ok_or_else(|| format!("the recipient {:?} is in no group", recipient.to_string()))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The part of each recipient, in RCPT order.
    pub fn part_of(&self) -> &[usize] {
        &self.0
    }

    fn parts(&self) -> usize {
        self.0.iter().max().map_or(0, |last| last + 1)
    }
}

/// Split a transaction into the messages that policy and the sink receive,
/// as `grouping` says. Each part gets its own id and a copy of the
/// transaction's metadata, and shares the transaction's `data`. Its `head`:
/// the supplemental header, then `received` (when the `Received:` header is
/// not already in `data`) naming the part's recipient when it has only one,
/// then `authentication_results` (the `Authentication-Results:` header).
pub fn split(
    transaction: &Message,
    grouping: &Grouping,
    supplemental: Option<&Supplemental>,
    received: Option<&ReceivedHeader>,
    authentication_results: Option<&str>,
) -> Vec<Arc<Message>> {
    let mut groups: Vec<Vec<Mailbox>> = vec![Vec::new(); grouping.parts()];
    for (recipient, &part) in transaction.recipients.iter().zip(grouping.part_of()) {
        groups[part].push(recipient.clone());
    }
    // One part is the transaction itself: its id, the one its `Received:`
    // header (in the body, for one recipient) and the 250 name, and its
    // metadata store (nobody sees the transaction after the split).
    let single = groups.len() == 1;
    let meta = if supplemental.is_some() { transaction.meta.snapshot() } else { Map::new() };
    let prepended = transaction.prepended();
    groups
        .into_iter()
        .map(|recipients| {
            let id = if single { transaction.id.clone() } else { new_message_id() };
            let mut head = String::from_utf8_lossy(&prepended).into_owned();
            if let Some(supplemental) = supplemental {
                head.push_str(&supplemental_header(supplemental, &recipients, &meta));
            }
            if let Some(received) = received {
                let only = match recipients.as_slice() {
                    [only] => Some(only),
                    _ => None,
                };
                head.push_str(&received.render(&id, only));
            }
            head.push_str(authentication_results.unwrap_or_default());
            Arc::new(Message {
                id,
                sender: transaction.sender.clone(),
                recipients,
                head: Bytes::from(head),
                prepended: Mutex::default(),
                data: transaction.data.clone(),
                meta: if single { transaction.meta.clone() } else { transaction.meta.copy() },
            })
        })
        .collect()
}

/// `Name: base64(JSON)` naming the recipient(s) and the chosen metadata.
fn supplemental_header(supplemental: &Supplemental, recipients: &[Mailbox], meta: &Map<String, Value>) -> String {
    let recipient = match recipients {
        [only] => Value::String(only.to_string()),
        many => many.iter().map(|r| Value::String(r.to_string())).collect(),
    };
    let mut object = Map::new();
    object.insert("_@_".into(), Value::String("\\_o< DUCK!".into()));
    object.insert("recipient".into(), recipient);
    for name in supplemental.include_meta_names {
        if let Some(value) = meta.get(name) {
            object.insert(name.clone(), value.clone());
        }
    }
    let encoded = BASE64.encode(Value::Object(object).to_string());
    fold_token(supplemental.header_name, &encoded)
}

/// The longest line a header may have, CRLF excluded (RFC 5322 §2.1.1).
pub const MAX_HEADER_LINE: usize = 998;

/// Where a token too long for one header line is broken, as KumoMTA
/// breaks its own supplemental header (its decoder drops the folding white space).
const TOKEN_FOLD_WIDTH: usize = 76;

/// `Name: token` on one line when it fits in [`MAX_HEADER_LINE`], else the
/// token broken into lines of [`TOKEN_FOLD_WIDTH`] octets after the first,
/// each folded (CRLF TAB). `token` is ASCII (base64).
fn fold_token(name: &str, token: &str) -> String {
    let mut header = String::with_capacity(name.len() + 4 + token.len() + 3 * (token.len() / TOKEN_FOLD_WIDTH));
    header.push_str(name);
    header.push_str(": ");
    if header.len() + token.len() <= MAX_HEADER_LINE {
        header.push_str(token);
    } else {
        for (index, piece) in token.as_bytes().chunks(TOKEN_FOLD_WIDTH).enumerate() {
            if index > 0 {
                header.push_str("\r\n\t");
            }
            header.push_str(std::str::from_utf8(piece).unwrap_or_default());
        }
    }
    header.push_str("\r\n");
    header
}

/// A header being written line by line: words are added on the current
/// line when it has room for them, else on a new, folded one (RFC 5322
/// §2.2.3), so that no line is longer than [`MAX_HEADER_LINE`] octets unless
/// one word is.
#[derive(Clone, Debug)]
struct Folded {
    text: String,
    /// Where the current line starts in `text`.
    line_start: usize,
}

impl Folded {
    fn line_len(&self) -> usize {
        self.text.len() - self.line_start
    }

    fn has_room_for(&self, len: usize) -> bool {
        self.line_len() + len <= MAX_HEADER_LINE
    }

    /// Where it is, to come back to with [`Folded::back_to`].
    fn mark(&self) -> (usize, usize) {
        (self.text.len(), self.line_start)
    }

    fn back_to(&mut self, (len, line_start): (usize, usize)) {
        self.text.truncate(len);
        self.line_start = line_start;
    }

    /// Start a new line: CRLF, then TAB.
    fn fold(&mut self) {
        self.text.push_str("\r\n");
        self.line_start = self.text.len();
        self.text.push('\t');
    }

    /// A space and `word`, or a new line and `word`.
    fn word(&mut self, word: impl fmt::Display) {
        let mark = self.text.len();
        let _ = write!(self.text, " {word}");
        if self.text.len() - self.line_start > MAX_HEADER_LINE && mark > self.line_start + 1 {
            let word = self.text.split_off(mark + 1);
            self.text.truncate(mark);
            self.fold();
            self.text.push_str(&word);
        }
    }
}

/// What a `Received:` header says about the transaction.
pub struct ReceivedInfo<'a> {
    pub helo_domain: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub protocol: &'a str,
}

/// How the `Received:` header starts; the HELO name follows.
const RECEIVED_FROM: &str = "Received: from ";

/// What ends a HELO name cut short to fit the first line of `Received:`.
const CUT_MARK: &str = "...";

/// An RFC 5321 §4.4 `Received:` header, made once per transaction and
/// rendered for each message that carries it, with or without `for`.
///
/// The client's words in it (the HELO name, the recipient) have their hidden
/// characters (controls, Unicode `Cf`, `Zl`, `Zp`: U+202E, U+2028…) written
/// as `\u{…}`, and no line is longer than [`MAX_HEADER_LINE`] octets: the
/// address literal goes on the next line when the HELO name leaves no room
/// for it, a HELO name too long for the first line by itself is cut (ending
/// in `...`), and a `for` clause too long for its line is left out (it is
/// optional).
#[derive(Clone, Debug)]
pub struct ReceivedHeader {
    /// Up to the protocol, with no id, `for` clause nor `;`.
    start: Folded,
    date: String,
}

impl ReceivedHeader {
    pub fn new(info: &ReceivedInfo) -> Self {
        let ReceivedInfo { helo_domain, client_ip, hostname, protocol } = info;
        let mut text = String::with_capacity(RECEIVED_FROM.len() + helo_domain.len() + hostname.len() + 96);
        text.push_str(RECEIVED_FROM);
        text.push_str(helo_domain);
        escape::escape_hidden_from(&mut text, RECEIVED_FROM.len());
        if text.len() > MAX_HEADER_LINE {
            escape::truncate_escaped(&mut text, RECEIVED_FROM.len(), MAX_HEADER_LINE - CUT_MARK.len());
            text.push_str(CUT_MARK);
        }
        let mut start = Folded { text, line_start: 0 };
        match client_ip {
            IpAddr::V4(ip) => start.word(format_args!("([{ip}])")),
            IpAddr::V6(ip) => start.word(format_args!("([IPv6:{ip}])")),
        }
        start.fold();
        let _ = write!(start.text, "by {hostname}");
        start.word("(kumo_listener)");
        start.word(format_args!("with {protocol}"));
        Self { start, date: rfc2822_now() }
    }

    /// Folded, ending in CRLF; `for <recipient>` only for a message to one
    /// recipient: naming one of several would disclose it to the others.
    /// `id` is the message's own: each file's header names the id its file name carries.
    pub fn render(&self, id: &str, recipient: Option<&Mailbox>) -> String {
        // Room for all of it (quotes and escapes aside): one allocation per message.
        let room_for_recipient = recipient.map_or(0, |only| only.local_part.len() + only.domain.len() + 16);
        let mut text =
            String::with_capacity(self.start.text.len() + id.len() + self.date.len() + 16 + room_for_recipient);
        text.push_str(&self.start.text);
        let mut header = Folded { text, line_start: self.start.line_start };
        header.word(format_args!("id {id}"));
        if let Some(only) = recipient {
            let before = header.mark();
            header.fold();
            let mark = header.text.len();
            let _ = write!(header.text, "for <{only}>");
            escape::escape_hidden_from(&mut header.text, mark);
            if !header.has_room_for(1) {
                header.back_to(before);
            }
        }
        header.text.push(';');
        header.fold();
        header.text.push_str(&self.date);
        header.text.push_str("\r\n");
        header.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(s: &str) -> Mailbox {
        let (local_part, domain) = s.split_once('@').unwrap();
        Mailbox::new(local_part, domain)
    }

    fn transaction(recipients: &[&str]) -> Arc<Message> {
        let message = Message::new(
            new_message_id(),
            mailbox("a@x.example"),
            recipients.iter().map(|r| mailbox(r)).collect(),
            Bytes::from_static(b"Subject: t\r\n\r\nbody\r\n"),
        );
        message.meta.set("tenant", "acme");
        message
    }

    #[test]
    fn ids_are_unique() {
        let a = new_message_id();
        let b = new_message_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn bifurcate_always_gives_one_message_per_recipient() {
        let parts = split_by(
            &transaction(&["1@a.example", "2@a.example", "3@b.example"]),
            BatchHandling::BifurcateAlways,
            None,
            None,
        );
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.recipients.len() == 1));
        assert_eq!(parts[0].meta.get_str("tenant").as_deref(), Some("acme"));
        assert_ne!(parts[0].id, parts[1].id);
    }

    #[test]
    fn parts_copy_the_metadata_and_a_single_part_keeps_the_transactions() {
        let several = transaction(&["1@a.example", "2@b.example"]);
        let parts = split_by(&several, BatchHandling::BifurcateAlways, None, None);
        parts[0].meta.set("tenant", "other");
        assert_eq!(parts[1].meta.get_str("tenant").as_deref(), Some("acme"));
        assert_eq!(several.meta.get_str("tenant").as_deref(), Some("acme"));
        let one = transaction(&["1@a.example"]);
        let parts = split_by(&one, BatchHandling::BifurcateAlways, None, None);
        assert_eq!(parts[0].id, one.id);
        parts[0].meta.set("seen", true);
        assert_eq!(one.meta.get("seen"), Some(Value::Bool(true)), "one part is the transaction itself");
    }

    #[test]
    fn the_date_of_trace_headers_is_local_time_of_now() {
        let before = chrono::Local::now().timestamp();
        let date = chrono::DateTime::parse_from_rfc2822(&rfc2822_now()).unwrap().timestamp();
        assert!((before..=before + 2).contains(&date), "{date} is not now ({before})");
    }

    #[test]
    fn batch_by_domain_groups_case_insensitively_in_first_seen_order() {
        let parts = split_by(
            &transaction(&["1@a.example", "2@b.example", "3@A.EXAMPLE"]),
            BatchHandling::BatchByDomain,
            None,
            None,
        );
        let domains: Vec<Vec<String>> =
            parts.iter().map(|p| p.recipients.iter().map(|r| r.to_string()).collect()).collect();
        assert_eq!(
            domains,
            vec![vec!["1@a.example".to_string(), "3@A.EXAMPLE".to_string()], vec!["2@b.example".to_string()]]
        );
    }

    #[test]
    fn each_recipient_is_in_the_part_named_for_it() {
        let message = transaction(&["1@a.example", "2@b.example", "3@A.EXAMPLE", "1@a.example"]);
        for handling in [BatchHandling::BifurcateAlways, BatchHandling::BatchByDomain] {
            let parts = split_by(&message, handling, None, None);
            let grouping = Grouping::by(handling, &message.recipients);
            assert_eq!(grouping.part_of().len(), message.recipients.len());
            for (recipient, &index) in message.recipients.iter().zip(grouping.part_of()) {
                assert!(parts[index].recipients.contains(recipient), "{handling:?}: {recipient} not in part {index}");
            }
        }
        assert_eq!(Grouping::by(BatchHandling::BatchByDomain, &message.recipients).part_of(), [0, 1, 0, 0]);
    }

    #[test]
    fn a_policys_groups_place_each_recipient_once() {
        let message = transaction(&["1@a.example", "2@b.example", "1@a.example"]);
        let groups = |groups: &[&[&str]]| -> Vec<Vec<String>> {
            groups.iter().map(|group| group.iter().map(|a| (*a).to_string()).collect()).collect()
        };
        let grouping = Grouping::from_groups(
            &message.recipients,
            &groups(&[&["2@b.example", "1@a.example"], &[], &["1@a.example"]]),
        );
        assert_eq!(grouping.unwrap().part_of(), [0, 0, 1]);
        let parts = split(
            &message,
            &Grouping::from_groups(&message.recipients, &groups(&[&["1@a.example", "1@a.example", "2@b.example"]]))
                .unwrap(),
            None,
            None,
            None,
        );
        assert_eq!(parts.len(), 1);
        let missing = Grouping::from_groups(&message.recipients, &groups(&[&["1@a.example", "2@b.example"]]));
        assert_eq!(missing.unwrap_err(), "the recipient \"1@a.example\" is in no group");
        let stranger = Grouping::from_groups(&message.recipients, &groups(&[&["x@c.example"]]));
        assert!(stranger.unwrap_err().starts_with("\"x@c.example\" is not a recipient"));
    }

    fn split_by(
        message: &Message,
        handling: BatchHandling,
        supplemental: Option<&Supplemental>,
        received: Option<&ReceivedHeader>,
    ) -> Vec<Arc<Message>> {
        split(message, &Grouping::by(handling, &message.recipients), supplemental, received, None)
    }

    fn same_bytes(a: &Body, b: &Body) -> bool {
        matches!((a, b), (Body::Memory(a), Body::Memory(b)) if a.as_ptr() == b.as_ptr())
    }

    /// A part's whole text, as policy sees it.
    fn text_of(part: &Message) -> String {
        let mut whole = vec![0; part.len()];
        part.read_into(&mut whole).unwrap();
        String::from_utf8(whole).unwrap()
    }

    #[test]
    fn supplemental_header_encodes_recipient_and_chosen_meta() {
        let names = vec!["tenant".to_string(), "absent".to_string()];
        let supplemental = Supplemental { header_name: "X-KumoRef", include_meta_names: &names };
        let transaction = transaction(&["1@a.example"]);
        let parts = split_by(&transaction, BatchHandling::BifurcateAlways, Some(&supplemental), None);
        let text = text_of(&parts[0]);
        let (header, rest) = text.split_once("\r\n").unwrap();
        assert_eq!(rest, "Subject: t\r\n\r\nbody\r\n");
        assert!(same_bytes(&parts[0].data, &transaction.data), "the body is shared, not copied");
        let encoded = header.strip_prefix("X-KumoRef: ").unwrap();
        let decoded: Value = serde_json::from_slice(&BASE64.decode(encoded).unwrap()).unwrap();
        assert_eq!(decoded, serde_json::json!({"_@_": "\\_o< DUCK!", "recipient": "1@a.example", "tenant": "acme"}));
    }

    fn info() -> ReceivedInfo<'static> {
        ReceivedInfo {
            helo_domain: "client.example",
            client_ip: "192.0.2.1".parse().unwrap(),
            hostname: "mx.example",
            protocol: "ESMTP",
        }
    }

    #[test]
    fn received_header_names_a_single_recipient_only() {
        let received = ReceivedHeader::new(&info());
        let header = received.render("abc", Some(&mailbox("r@b.example")));
        assert!(header.starts_with("Received: from client.example ([192.0.2.1])\r\n\tby mx.example"));
        assert!(header.contains(" with ESMTP id abc\r\n\tfor <r@b.example>;\r\n\t"), "{header:?}");
        assert!(header.ends_with("\r\n"));
        let header = received.render("abc", None);
        assert!(header.contains(" id abc;\r\n\t") && !header.contains("for <"), "{header:?}");
    }

    /// Every line of `header` (CRLF-separated, ending in CRLF) is at most
    /// 998 octets, and each after the first is folded (starts with white space).
    fn assert_folded(header: &str) {
        let lines: Vec<&str> = header.strip_suffix("\r\n").expect("ends in CRLF").split("\r\n").collect();
        for (index, line) in lines.iter().enumerate() {
            assert!(line.len() <= MAX_HEADER_LINE, "line {index} of {} octets: {header:?}", line.len());
            assert!(index == 0 || line.starts_with('\t'), "line {index} not folded: {header:?}");
            assert!(!line.contains(['\r', '\n']), "{header:?}");
        }
    }

    fn received_from(helo: &str, ip: &str) -> ReceivedHeader {
        ReceivedHeader::new(&ReceivedInfo { helo_domain: helo, client_ip: ip.parse().unwrap(), ..info() })
    }

    /// The longest HELO a session accepts with `line_length_hard_limit` 998:
    /// `HELO ` and 993 octets.
    #[test]
    fn received_lines_fit_in_998_octets_whatever_the_helo() {
        for len in [900, 970, 976, 983, 984, 993, 5000] {
            let helo = "h".repeat(len);
            for ip in ["192.0.2.1", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"] {
                let header = received_from(&helo, ip).render("0123456789abcdef0123456789abcdef", None);
                assert_folded(&header);
                let first = header.split("\r\n").next().unwrap();
                if len <= MAX_HEADER_LINE - RECEIVED_FROM.len() {
                    assert!(first.starts_with(&format!("Received: from {helo}")), "{len}: {first:?}");
                    let literal = if ip.contains(':') { format!("([IPv6:{ip}])") } else { format!("([{ip}])") };
                    let folded = RECEIVED_FROM.len() + len + 1 + literal.len() > MAX_HEADER_LINE;
                    assert_eq!(header.contains(&format!("{helo}\r\n\t{literal}\r\n")), folded, "{len} {ip}");
                } else {
                    // Cut to fit, and said so.
                    assert_eq!(first.len(), MAX_HEADER_LINE, "{len}");
                    assert!(first.ends_with("hhh..."), "{first:?}");
                }
            }
        }
    }

    #[test]
    fn hidden_characters_of_the_client_are_escaped_in_received() {
        let received = received_from("a\u{202e}moc.elgoog\u{2028}b\u{200b}", "192.0.2.1");
        let recipient = Mailbox::new("r\u{2029}\u{feff}", "b.example");
        let header = received.render("abc", Some(&recipient));
        assert!(
            header.starts_with("Received: from a\\u{202e}moc.elgoog\\u{2028}b\\u{200b} ([192.0.2.1])\r\n"),
            "{header:?}"
        );
        assert!(header.contains("\tfor <r\\u{2029}\\u{feff}@b.example>;\r\n"), "{header:?}");
        assert!(!header.contains(['\u{202e}', '\u{2028}', '\u{2029}', '\u{200b}', '\u{feff}']));
        // Cut short, a HELO name loses whole escapes only.
        let helo = format!("{}\u{202e}", "h".repeat(977));
        let first = received_from(&helo, "192.0.2.1").render("abc", None);
        assert!(first.starts_with(&format!("Received: from {}...\r\n", "h".repeat(977))), "{first:?}");
    }

    #[test]
    fn a_for_clause_too_long_for_its_line_is_left_out() {
        let received = received_from("client.example", "192.0.2.1");
        // A long SMTPUTF8 address: 240 zero-width spaces (720 octets) take 1,920 escaped.
        let long = Mailbox::new(format!("ü{}", "\u{200b}".repeat(240)), "b.example");
        let header = received.render("abc", Some(&long));
        assert_folded(&header);
        assert!(header.contains(" id abc;\r\n\t") && !header.contains("for <"), "{header:?}");
        let fits = Mailbox::new(format!("ü{}", "ä".repeat(489)), "b.example");
        let header = received.render("abc", Some(&fits));
        assert_folded(&header);
        assert!(header.contains(&format!("\tfor <{fits}>;\r\n")), "{header:?}");
    }

    #[test]
    fn a_supplemental_header_too_long_for_one_line_is_folded() {
        let names = vec!["tenant".to_string()];
        let supplemental = Supplemental { header_name: "X-KumoRef", include_meta_names: &names };
        let transaction = transaction(&["1@a.example"]);
        transaction.meta.set("tenant", "t".repeat(2000));
        let parts = split_by(&transaction, BatchHandling::BifurcateAlways, Some(&supplemental), None);
        let text = text_of(&parts[0]);
        let (header, rest) = text.split_once("\r\nSubject:").unwrap();
        assert_eq!(rest, " t\r\n\r\nbody\r\n");
        let header = format!("{header}\r\n");
        assert_folded(&header);
        assert!(header.lines().count() > 30);
        // Unfolded, and the folding white space dropped (as KumoMTA does), it decodes.
        let encoded: String = header.strip_prefix("X-KumoRef: ").unwrap().split_whitespace().collect();
        let decoded: Value = serde_json::from_slice(&BASE64.decode(encoded).unwrap()).unwrap();
        assert_eq!(decoded["tenant"], "t".repeat(2000));
        // Short, it stays on one line.
        transaction.meta.set("tenant", "acme");
        let parts = split_by(&transaction, BatchHandling::BifurcateAlways, Some(&supplemental), None);
        assert!(text_of(&parts[0]).split_once("\r\n").unwrap().1.starts_with("Subject:"));
    }

    #[test]
    fn each_part_of_one_recipient_gets_its_own_for_clause_and_shares_the_body() {
        let received = ReceivedHeader::new(&info());
        let transaction = transaction(&["1@a.example", "2@a.example", "3@b.example"]);
        let parts = split_by(&transaction, BatchHandling::BifurcateAlways, None, Some(&received));
        for (part, recipient) in parts.iter().zip(["1@a.example", "2@a.example", "3@b.example"]) {
            let text = text_of(part);
            assert!(text.starts_with("Received: from client.example"), "{text:?}");
            assert!(text.contains(&format!("for <{recipient}>;")), "{text:?}");
            assert!(text.ends_with("\r\nSubject: t\r\n\r\nbody\r\n"));
            assert!(same_bytes(&part.data, &transaction.data));
        }
        let parts = split_by(&transaction, BatchHandling::BatchByDomain, None, Some(&received));
        assert!(!text_of(&parts[0]).contains("for <"), "two recipients: no for clause");
        assert!(text_of(&parts[1]).contains("for <3@b.example>;"));
    }
}
