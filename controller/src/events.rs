//! Event vocabulary beside the conditions: the key lifecycle Events of an ApiClient and the note length limit.
//! No I/O. Notes name Secrets and fingerprints (`sha256:` + 12 hex digits), never key material.

/// The API server refuses an Event whose note exceeds 1 KiB (events.k8s.io/v1 `note`, counted in bytes).
pub const MAX_NOTE_BYTES: usize = 1024;

const ELLIPSIS: &str = "…";

pub mod reason {
    /// A generated key was created (Normal).
    pub const KEY_GENERATED: &str = "KeyGenerated";
    /// A generated key's Secret was missing and a NEW key was generated in its place (Warning).
    pub const KEY_REGENERATED: &str = "KeyRegenerated";
    /// A generated key Secret no entry names any more was deleted (Normal).
    pub const KEY_DELETED: &str = "KeyDeleted";
}

/// `note` cut to at most [`MAX_NOTE_BYTES`] bytes on a character boundary, ending in an ellipsis when cut, so that
/// a long message (many keys, many Services) still produces an Event instead of a refused one.
pub fn truncate_note(note: String) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note;
    }
    let mut cut = MAX_NOTE_BYTES - ELLIPSIS.len();
    while !note.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{ELLIPSIS}", &note[..cut])
}

/// An Event about a generated key: (reason, is it a warning, note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    pub reason: &'static str,
    pub warning: bool,
    pub note: String,
}

/// The Event for a key generated into `secret`. `previous` is the fingerprint status last recorded for this key
/// name, if any: then the Secret was deleted behind the controller's back and the new key is a different one.
pub fn key_generated(key_name: &str, secret: &str, fingerprint: &str, previous: Option<&str>) -> KeyEvent {
    match previous {
        None => KeyEvent {
            reason: reason::KEY_GENERATED,
            warning: false,
            note: format!("generated key {key_name:?} ({fingerprint}) into Secret {secret}"),
        },
        Some(old) => KeyEvent {
            reason: reason::KEY_REGENERATED,
            warning: true,
            note: format!(
                "Secret {secret} of key {key_name:?} was missing: generated a NEW key ({fingerprint}) into it; the \
                 previous key ({old}) no longer works, hand the new one out"
            ),
        },
    }
}

/// The Event for a generated key Secret deleted because no entry names it any more.
pub fn key_deleted(secret: &str, fingerprint: Option<&str>) -> KeyEvent {
    let what = fingerprint.map(|f| format!(" (key {f})")).unwrap_or_default();
    KeyEvent {
        reason: reason::KEY_DELETED,
        warning: false,
        note: format!("deleted generated key Secret {secret}{what}: no entry of spec.keys names it any more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_notes_are_kept_and_long_ones_cut_on_a_char_boundary() {
        assert_eq!(truncate_note("short".into()), "short");
        let exact = "x".repeat(MAX_NOTE_BYTES);
        assert_eq!(truncate_note(exact.clone()), exact);
        let long = "é".repeat(MAX_NOTE_BYTES); // 2 bytes each
        let t = truncate_note(long);
        assert!(t.len() <= MAX_NOTE_BYTES, "{}", t.len());
        assert!(t.ends_with('…'));
        assert!(t.len() > MAX_NOTE_BYTES - 8, "cut no more than needed");
        let mixed = format!("{}{}", "a".repeat(1019), "€€€");
        let t = truncate_note(mixed);
        assert!(t.len() <= MAX_NOTE_BYTES && t.ends_with('…') && t.starts_with(&"a".repeat(1019)), "{t}");
    }

    #[test]
    fn key_events_carry_fingerprints_and_say_a_regenerated_key_is_new() {
        let e = key_generated("k2", "acme-key-k2", "sha256:0123456789ab", None);
        assert_eq!((e.reason, e.warning), ("KeyGenerated", false));
        assert!(e.note.contains("sha256:0123456789ab") && e.note.contains("acme-key-k2"));
        let e = key_generated("k2", "acme-key-k2", "sha256:0123456789ab", Some("sha256:ba9876543210"));
        assert_eq!((e.reason, e.warning), ("KeyRegenerated", true));
        assert!(e.note.contains("NEW key (sha256:0123456789ab)") && e.note.contains("sha256:ba9876543210"));
        assert!(key_deleted("acme-key-k1", Some("sha256:0123456789ab")).note.contains("sha256:0123456789ab"));
    }
}
