//! Who removes a translated backend flow's kernel entry, on the origin.
//!
//! When a pod moves to a new address, `target` installs a translation for
//! each held connection's backend flow (`control::origin`), and the
//! connection removes it when that backend socket is done (`endpoint`,
//! `relay::connection`). The two race: a connection may close while
//! `target` runs. [`FlowTranslation`] is the one place that decides, and
//! its transitions are pure: the callers hold the connection's lock around
//! them and do the kernel work the answer names.
use shepherd_common::FlowKey;

/// Where a connection's backend-flow translation stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FlowTranslation {
    /// Nothing installed for the current backend socket.
    #[default]
    None,
    /// `target` installed this entry; the connection removes it.
    Installed(FlowKey),
    /// The connection is closing: nothing may be installed for it any more.
    Done,
}

impl FlowTranslation {
    /// `target` installed `key` for this connection's backend flow. Returns
    /// whether the connection took it over; if not (its backend socket is
    /// gone, `backend_alive` false, or the connection is closing), the
    /// caller removes the entry itself, since nobody else will.
    pub fn install(&mut self, key: FlowKey, backend_alive: bool) -> bool {
        if !backend_alive || *self == FlowTranslation::Done {
            return false;
        }
        *self = FlowTranslation::Installed(key);
        true
    }

    /// The backend socket is done: the installed entry to remove, if any.
    /// `last`: no later backend socket of this connection can need one
    /// either (the connection is closing), so none may be installed after.
    pub fn take(&mut self, last: bool) -> Option<FlowKey> {
        let key = match *self {
            FlowTranslation::Installed(k) => Some(k),
            _ => None,
        };
        *self = if last || *self == FlowTranslation::Done {
            FlowTranslation::Done
        } else {
            FlowTranslation::None
        };
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey::new([10, 0, 0, 1], port, [10, 0, 1, 1], 6379)
    }

    #[test]
    fn an_installed_entry_is_removed_once_by_the_connection() {
        let mut t = FlowTranslation::default();
        assert!(t.install(key(1), true));
        assert_eq!(t.take(false), Some(key(1)));
        assert_eq!(t.take(false), None, "removed once");
        // A reconnect's new socket may be translated in turn.
        assert!(t.install(key(2), true));
        assert_eq!(t.take(true), Some(key(2)));
    }

    #[test]
    fn nothing_is_taken_over_for_a_gone_socket_or_a_closing_connection() {
        let mut t = FlowTranslation::default();
        assert!(!t.install(key(1), false), "backend socket gone");
        assert_eq!(t, FlowTranslation::None);
        assert_eq!(t.take(true), None);
        assert_eq!(t, FlowTranslation::Done);
        assert!(!t.install(key(2), true), "closing: the caller removes it");
        // Done stays done.
        assert_eq!(t.take(false), None);
        assert_eq!(t, FlowTranslation::Done);
    }

    #[test]
    fn retargeting_replaces_the_entry_the_connection_owns() {
        let mut t = FlowTranslation::default();
        assert!(t.install(key(1), true));
        assert!(t.install(key(3), true));
        assert_eq!(t.take(false), Some(key(3)));
    }
}
