//! The policy event contract: the events a session raises ([`EventKind`],
//! declared once here in [`with_events`] with their registration names and
//! arguments, which Python gets as `_core.EVENTS`), their arguments ([`Event`]) and how a call ends
//! ([`Outcome`], [`Response`]; what `get_listener_domain` says is a
//! [`ListenerDomain`], parsed in [`crate::params`]).

use crate::message::Message;
use crate::meta::MetaStore;
use crate::params::{GenericParams, ListenerDomain};
use crate::protocol::parser::Mailbox;
use crate::protocol::sasl::PlainCredentials;
use std::sync::Arc;

/// The event Python runs once at start-up. Sessions never raise it, so it
/// has no [`EventKind`]; it is declared here so that every event name a
/// policy may register is in this file.
pub const INIT: &str = "init";

/// Every policy event a session raises, declared once: its variant, its
/// registration name, the names of the handler's arguments, and the fields
/// the event carries to make them. Calls `$then!` with the list, so that
/// the declarations here ([`declare_events`]) and the binding's
/// marshalling of the arguments (`rust/py`) follow the one list.
#[macro_export]
macro_rules! with_events {
    ($then:ident) => {
        $then! {
            GetDynamicParameters => "smtp_server_get_dynamic_parameters" (listener, conn_meta)
                { listener: Arc<str>, meta: MetaStore },
            ConnectionAccepted => "smtp_server_connection_accepted" (conn_meta) { meta: MetaStore },
            Ehlo => "smtp_server_ehlo" (domain, conn_meta, extensions)
                { domain: String, meta: MetaStore, extensions: Vec<String> },
            MailFrom => "smtp_server_mail_from" (sender, conn_meta) { sender: Mailbox, meta: MetaStore },
            RcptTo => "smtp_server_rcpt_to" (recipient, conn_meta) { recipient: Mailbox, meta: MetaStore },
            GetListenerDomain => "get_listener_domain" (domain, listener, conn_meta)
                { domain: String, listener: Arc<str>, meta: MetaStore },
            Data => "smtp_server_data" (message, conn_meta) { message: Arc<Message>, meta: MetaStore },
            SplitTransaction => "smtp_server_split_transaction" (message, conn_meta)
                { message: Arc<Message>, meta: MetaStore },
            MessageReceived => "smtp_server_message_received" (message, conn_meta)
                { message: Arc<Message>, meta: MetaStore },
            AuthPlain => "smtp_server_auth_plain" (authz, authc, password, conn_meta)
                { credentials: PlainCredentials, meta: MetaStore },
            RewriteResponse => "smtp_server_rewrite_response" (status, response, command, conn_meta)
                { status: u16, response: String, command: Option<String>, meta: MetaStore },
        }
    };
}

/// Declares [`EventKind`] (with `ALL`, `name()`, `from_name()`,
/// `arguments()`) and [`Event`] (with `kind()`) from [`with_events`].
macro_rules! declare_events {
    ($($kind:ident => $name:literal ($($argument:ident),*) { $($field:ident: $ty:ty),* },)*) => {
        /// The policy events a session can raise, by their registration names.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum EventKind {
            $($kind,)*
        }

        impl EventKind {
            pub const ALL: [EventKind; [$($name),*].len()] = [$(EventKind::$kind),*];

            pub fn name(self) -> &'static str {
                match self {
                    $(EventKind::$kind => $name,)*
                }
            }

            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(EventKind::$kind),)*
                    _ => None,
                }
            }

            /// The names of its handler's arguments, in order.
            pub fn arguments(self) -> &'static [&'static str] {
                match self {
                    $(EventKind::$kind => &[$(stringify!($argument)),*],)*
                }
            }
        }

        /// An event with its arguments.
        #[derive(Debug)]
        pub enum Event {
            $($kind { $($field: $ty),* },)*
        }

        impl Event {
            pub fn kind(&self) -> EventKind {
                match self {
                    $(Event::$kind { .. } => EventKind::$kind,)*
                }
            }
        }
    };
}

with_events!(declare_events);

impl EventKind {
    /// Its bit in a set of kinds kept as a `u32`.
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// Every name a policy may register a handler under: [`INIT`], then the
/// session events.
pub fn names() -> impl Iterator<Item = &'static str> {
    std::iter::once(INIT).chain(EventKind::ALL.into_iter().map(EventKind::name))
}

/// Why `name` is not an event, with the closest event name (by the pairs
/// of adjacent characters they share, which favours a missing suffix like
/// `_to` over a changed word) when one is close enough to be a likely typo.
pub fn unknown(name: &str) -> String {
    let closest = names()
        .map(|known| (strsim::sorensen_dice(name, known), known))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .filter(|(similarity, _)| *similarity >= 0.6);
    match closest {
        Some((_, known)) => format!("unknown event '{name}'; did you mean '{known}'?"),
        None => {
            let mut known: Vec<&str> = names().collect();
            known.sort_unstable();
            format!("unknown event '{name}'; known events: {}", known.join(", "))
        }
    }
}

/// A handler's successful result, already converted to native types.
#[derive(Debug)]
pub enum Response {
    Nothing,
    /// Shared: a `ListenerParams` returned again and again is not copied.
    Params(Arc<GenericParams>),
    Extensions(Vec<String>),
    ListenerDomain(ListenerDomain),
    /// What `smtp_server_auth_plain` decided.
    Authenticated(bool),
    /// `smtp_server_split_transaction`'s groups of recipient addresses.
    Groups(Vec<Vec<String>>),
    /// `smtp_server_rewrite_response`'s new status and text, each `None` to keep it.
    Rewritten {
        status: Option<u16>,
        response: Option<String>,
    },
}

/// How a policy call ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Response),
    /// The handler raised `Reject(code, text)`.
    Reject {
        code: u16,
        text: String,
    },
    /// The handler raised, returned something unusable, or timed out. Already logged.
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(EventKind::from_name(INIT), None);
        assert_eq!(names().count(), EventKind::ALL.len() + 1);
    }

    #[test]
    fn every_handler_gets_the_connection_metadata() {
        for kind in EventKind::ALL {
            assert!(kind.arguments().contains(&"conn_meta"), "{kind:?}");
        }
    }

    #[test]
    fn every_kind_has_its_own_bit() {
        let mask = EventKind::ALL.into_iter().fold(0, |mask, kind| mask | kind.bit());
        assert_eq!(mask.count_ones() as usize, EventKind::ALL.len());
    }

    #[test]
    fn an_unknown_name_suggests_the_closest_event() {
        assert_eq!(
            unknown("smtp_server_rcpt"),
            "unknown event 'smtp_server_rcpt'; did you mean 'smtp_server_rcpt_to'?"
        );
        assert_eq!(
            unknown("smtp_server_mail"),
            "unknown event 'smtp_server_mail'; did you mean 'smtp_server_mail_from'?"
        );
        assert_eq!(unknown("smtp_server_ehol"), "unknown event 'smtp_server_ehol'; did you mean 'smtp_server_ehlo'?");
        let far = unknown("on_connect");
        assert!(far.starts_with("unknown event 'on_connect'; known events: get_listener_domain, init, "), "{far}");
    }
}
