//! What one node tells another (docs/cluster.md, "Notices"): items of ids
//! only, in the text form `mesh.notify_nodes` carries them. Spoken by the
//! bus and by operator commands that change what a broker should claim
//! (`dead-letters requeue`).

use uuid::Uuid;

use crate::ids::{DeliveryId, MemberId, PresenceId};

/// A system event about a connection, as notices name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    Joined,
    Left,
    Visible,
    Hidden,
}

impl Event {
    /// Its name in a system push.
    pub fn name(self) -> &'static str {
        match self {
            Event::Joined => "peer_joined",
            Event::Left => "peer_left",
            Event::Visible => "peer_visible",
            Event::Hidden => "peer_hidden",
        }
    }
}

/// Why another node asks this one to close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseFor {
    /// A newer hello of the same identity, on another node.
    Replaced,
    /// An admin's `kick` on another node.
    Kicked,
    /// An admin's `disconnect` on another node.
    Disconnected,
}

/// One item of a notice between nodes. Ids only: what an id stands for is
/// read from the database by whoever needs more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Notice {
    /// Wake this member's drain.
    Wake(MemberId),
    /// This connection's status changed: wake its drain.
    Status(PresenceId),
    /// The sweeper cleared this delivery's lease, which ran out at this
    /// unix µs (`None`: dead-lettered it).
    Reclaimed(MemberId, DeliveryId, Option<i64>),
    /// Tell the mesh's other members about this connection.
    Event(Event, PresenceId),
    /// Close this connection.
    Close(CloseFor, PresenceId),
    /// A node joined the cluster (sent by it as it registers): there is
    /// someone to tell now, before the next heartbeat says so.
    NodeJoined,
}

impl Notice {
    /// The item's text: a letter and the id (no dashes), e.g. `w…`.
    pub fn encode(&self) -> String {
        let (letter, id) = match *self {
            Notice::Wake(m) => ('w', m.0),
            Notice::Status(p) => ('s', p.0),
            Notice::Reclaimed(m, d, until) => {
                return match until {
                    Some(t) => format!("x{}:{d}:{t}", m.0.simple()),
                    None => format!("x{}:{d}", m.0.simple()),
                }
            }
            Notice::Event(e, p) => (
                match e {
                    Event::Joined => 'j',
                    Event::Left => 'l',
                    Event::Visible => 'v',
                    Event::Hidden => 'h',
                },
                p.0,
            ),
            Notice::NodeJoined => return "n".to_owned(),
            Notice::Close(c, p) => (
                match c {
                    CloseFor::Kicked => 'k',
                    CloseFor::Disconnected => 'd',
                    CloseFor::Replaced => 'r',
                },
                p.0,
            ),
        };
        format!("{letter}{}", id.simple())
    }

    /// Reads one item; `None` for anything else (a newer node's item kind,
    /// or the header).
    pub fn decode(item: &str) -> Option<Notice> {
        let mut chars = item.chars();
        let letter = chars.next()?;
        let rest = chars.as_str();
        let id = || Uuid::parse_str(rest).ok();
        Some(match letter {
            'w' => Notice::Wake(MemberId(id()?)),
            's' => Notice::Status(PresenceId(id()?)),
            'x' => {
                let mut parts = rest.split(':');
                let m = MemberId(Uuid::parse_str(parts.next()?).ok()?);
                let d = parts.next()?.parse().ok()?;
                let until = match parts.next() {
                    Some(t) => Some(t.parse().ok()?),
                    None => None,
                };
                Notice::Reclaimed(m, d, until)
            }
            'j' => Notice::Event(Event::Joined, PresenceId(id()?)),
            'l' => Notice::Event(Event::Left, PresenceId(id()?)),
            'v' => Notice::Event(Event::Visible, PresenceId(id()?)),
            'h' => Notice::Event(Event::Hidden, PresenceId(id()?)),
            'k' => Notice::Close(CloseFor::Kicked, PresenceId(id()?)),
            'd' => Notice::Close(CloseFor::Disconnected, PresenceId(id()?)),
            'r' => Notice::Close(CloseFor::Replaced, PresenceId(id()?)),
            'n' if rest.is_empty() => Notice::NodeJoined,
            _ => return None,
        })
    }
}

/// A notification's payload: an optional header `t<unix µs>` (when it was
/// sent, for the cross-node latency), then items, space-separated.
pub fn decode_payload(payload: &str) -> (Option<i64>, Vec<Notice>) {
    let mut sent = None;
    let mut items = Vec::new();
    for token in payload.split_ascii_whitespace() {
        if let Some(t) = token.strip_prefix('t') {
            sent = sent.or(t.parse().ok());
        } else if let Some(n) = Notice::decode(token) {
            items.push(n);
        }
    }
    (sent, items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_read_back_as_written() {
        let id = Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let all = [
            Notice::Wake(MemberId(id)),
            Notice::Status(PresenceId(id)),
            Notice::Reclaimed(MemberId(id), 42, None),
            Notice::Reclaimed(MemberId(id), 43, Some(1_700_000_000_123_456)),
            Notice::Event(Event::Joined, PresenceId(id)),
            Notice::Event(Event::Left, PresenceId(id)),
            Notice::Event(Event::Visible, PresenceId(id)),
            Notice::Event(Event::Hidden, PresenceId(id)),
            Notice::Close(CloseFor::Kicked, PresenceId(id)),
            Notice::Close(CloseFor::Disconnected, PresenceId(id)),
            Notice::Close(CloseFor::Replaced, PresenceId(id)),
            Notice::NodeJoined,
        ];
        let payload = std::iter::once("t1700000000000000".to_owned())
            .chain(all.iter().map(Notice::encode))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            decode_payload(&payload),
            (Some(1_700_000_000_000_000), all.to_vec())
        );
        // The hello's SQL writes ids with dashes.
        assert_eq!(
            Notice::decode(&format!("r{id}")),
            Some(Notice::Close(CloseFor::Replaced, PresenceId(id)))
        );
        assert_eq!(Notice::encode(&Notice::Wake(MemberId(id))).len(), 33);
    }

    #[test]
    fn unknown_items_are_skipped() {
        let (sent, items) = decode_payload("q123 w-not-a-uuid x:1 tnope");
        assert_eq!(sent, None);
        assert!(items.is_empty());
    }
}
