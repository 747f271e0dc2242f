//! Pushes to subscribers, encoded once per change and shared by every subscriber.
//!
//! A write asks for a push ([`shoal_replication::Action::Publish`]) while it holds the
//! replica's write lock. That call only notes, in the [`PushQueue`], the services that
//! changed and have subscribers here, with the revision of their latest change. The
//! node's push thread takes what is noted, reads each service's current view under the
//! read lock, encodes one `Push` frame and queues the same bytes (an [`EncodedFrame`])
//! to every subscriber of the service. So reading and encoding no longer hold up
//! writers, and changes of one service that come faster than they are pushed are
//! pushed once, as the latest state (a view is the whole instance list anyway).
//!
//! Order: each subscription remembers the revision of the last view queued to it (the
//! Subscribe answer's or the last push's), and a view is queued only if its revision
//! is higher. Revisions strictly increase with every change of a service (the
//! registry's stamp), so a subscriber never sees an older view after a newer one, nor
//! the same one twice; a push read before a Subscribe answer but delivered after it is
//! dropped. Every change is noted before its write lock is released, and the push
//! thread reads the state after it took the note, so the latest state of a service is
//! always pushed.
//!
//! When the query cache holds the answer of an unfiltered query of the service at its
//! current revision, its bytes are reused: the view's encoding is the same in a `View`
//! answer and in a `Push` frame, only the few bytes around it differ.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use shoal_storage::ServiceKey;

/// One whole frame (length prefix and body), encoded once and queued to many clients.
pub type EncodedFrame = Arc<[u8]>;

/// The services waiting for a push, each with the revision of its latest change.
#[derive(Default)]
struct Pending {
    services: HashMap<ServiceKey, u64>,
    closed: bool,
}

/// What the writers note and the push thread takes; see the module docs.
#[derive(Default)]
pub struct PushQueue {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl PushQueue {
    /// Notes that these services changed (at these revisions) and wakes the push thread.
    pub fn add(&self, changed: impl IntoIterator<Item = (ServiceKey, u64)>) {
        let mut pending = crate::state::lock(&self.pending);
        let before = pending.services.len();
        for (key, revision) in changed {
            let r = pending.services.entry(key).or_insert(revision);
            *r = (*r).max(revision);
        }
        let woke = before == 0 && !pending.services.is_empty();
        drop(pending);
        if woke {
            self.wake.notify_one();
        }
    }

    /// Waits until some services are noted and takes them, ordered by revision;
    /// `None` once the queue is closed.
    pub fn take(&self) -> Option<Vec<(ServiceKey, u64)>> {
        let mut pending = crate::state::lock(&self.pending);
        loop {
            if pending.closed {
                return None;
            }
            if !pending.services.is_empty() {
                let mut taken: Vec<_> = std::mem::take(&mut pending.services).into_iter().collect();
                drop(pending);
                taken.sort_unstable_by_key(|(_, revision)| *revision);
                return Some(taken);
            }
            pending = self.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Ends the push thread (the node's state is going away).
    pub fn close(&self) {
        crate::state::lock(&self.pending).closed = true;
        self.wake.notify_all();
    }
}

/// The encoded `result` of an unfiltered query's answer, `Ok(View(view))` as
/// [`shoal_proto::encode_result`] writes it: this prefix, then the view.
const ANSWER_PREFIX: &[u8] = &[0x81, 0xa2, b'O', b'k', 0x81, 0xa4, b'V', b'i', b'e', b'w'];
/// The body of a `Push(view)` frame as [`shoal_proto::encode_frame`] writes it: this
/// prefix, then the view.
const PUSH_PREFIX: &[u8] = &[0x81, 0xa4, b'P', b'u', b's', b'h'];

/// The `Push` frame of the view a cached query answer holds, without decoding or
/// encoding the view. `None` if the answer is not a view (or too large for a frame).
pub fn push_frame_from_answer(answer: &[u8], max: usize) -> Option<EncodedFrame> {
    let view = answer.strip_prefix(ANSWER_PREFIX)?;
    let len = PUSH_PREFIX.len() + view.len();
    if len > max {
        return None;
    }
    let mut out = Vec::with_capacity(shoal_proto::LEN_PREFIX_BYTES + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(PUSH_PREFIX);
    out.extend_from_slice(view);
    Some(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{encode_frame, encode_result, Response, ServerFrame};
    use shoal_storage::{Instance, Lease, ServiceView, SessionId};

    fn view() -> ServiceView {
        let inst = |ip: &str| Instance {
            ip: ip.into(),
            port: 8080,
            cluster: "eu".into(),
            weight: 2.5,
            healthy: true,
            enabled: true,
            metadata: [("seq".to_string(), "7".to_string())].into(),
            lease: Lease::Session(SessionId(0)),
            last_beat_ms: 1_700_000_000_000,
            stamp: 41,
        };
        ServiceView {
            key: ServiceKey::named("orders"),
            revision: 300,
            instances: vec![inst("10.0.0.1"), inst("10.0.0.2")],
            protected: false,
        }
    }

    #[test]
    fn a_cached_answer_gives_the_same_bytes_as_encoding_the_push() {
        let max = shoal_proto::DEFAULT_MAX_FRAME_BYTES;
        let answer = encode_result(&Ok(Response::View(view()))).unwrap();
        let from_answer = push_frame_from_answer(&answer, max).unwrap();
        let encoded = encode_frame(&ServerFrame::Push(view()), max).unwrap();
        assert_eq!(&from_answer[..], &encoded[..]);
        // Too large for a frame, or not a view: not used.
        assert!(push_frame_from_answer(&answer, encoded.len() - 5).is_none());
        let other = encode_result(&Ok(Response::Done)).unwrap();
        assert!(push_frame_from_answer(&other, max).is_none());
    }

    #[test]
    fn the_queue_keeps_the_latest_revision_of_each_service() {
        let q = PushQueue::default();
        let (a, b) = (ServiceKey::named("a"), ServiceKey::named("b"));
        q.add([(a.clone(), 5), (b.clone(), 3), (a.clone(), 7)]);
        q.add([(a.clone(), 6)]);
        assert_eq!(q.take(), Some(vec![(b, 3), (a, 7)]));
        q.close();
        assert_eq!(q.take(), None);
    }
}
