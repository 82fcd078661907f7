//! The request path, normalised once: the decision's route scopes are matched against this path, and it is the
//! path the application receives, so the application never sees a path other than the one that was checked.
//!
//! The rule, applied to the path of the request target (origin form, or the path of an absolute-form / h2 target;
//! the query is not touched here):
//!
//! 1. The path must start with `/` (anything else — `*`, an authority-form target, an empty path — is refused).
//! 2. Percent-escapes are decoded when they stand for an unreserved character (`A-Z a-z 0-9 - . _ ~`, RFC 3986
//!    §2.3); every other escape is kept, with upper-case hex digits (§6.2.2.1). A `%` not followed by two hex
//!    digits is refused.
//! 3. An escaped `/` or `\` (`%2F`, `%5C`, any case) is refused, unless [`EscapedSlashes::Keep`] (then it is kept,
//!    as `%2F` / `%5C`, and is not a separator for the decision). A raw `\` and an escaped NUL (`%00`) are always
//!    refused. An escaped overlong UTF-8 sequence (`%C0%AE`, `%C0%AF`, `%E0%80%AE`: `.`, `/` to a lenient decoder)
//!    is always refused.
//! 4. Repeated slashes are merged (`/a//b` → `/a/b`, as Envoy's `merge_slashes`).
//! 5. Dot segments are removed (RFC 3986 §5.2.4), after the decoding above, so `%2e%2e` is `..`. A `..` that would
//!    climb above the root is refused (not clamped).
//! 6. `;` parameters are kept as they are, but a segment that is `.` or `..` once everything from its first `;`
//!    (raw or `%3B`) is removed — `..;x`, `.;` — is refused: servers that strip path parameters (Tomcat, Jetty)
//!    would read it as a dot segment.
//!
//! Refusals are 400 `invalid_path`. The result is idempotent, and a path already in normal form (the common case)
//! is returned borrowed, without allocating.

use std::borrow::Cow;

/// What to do with `%2F` / `%5C` in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Refuse the request (400 `invalid_path`).
    #[default]
    Reject,
    /// Keep them escaped, as part of the segment they are in (`--allow-escaped-slashes`).
    Keep,
}

/// Why a path cannot be normalised safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not `/...`: `*`, authority form, empty.
    NotOriginForm,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C` (with [`EscapedSlashes::Reject`]).
    EscapedSlash,
    /// A raw `\`.
    Backslash,
    /// `%00`.
    Nul,
    /// `..` above the root.
    AboveRoot,
    /// `..;x`, `.;x`: a dot segment to servers that strip `;` parameters.
    DotSegmentWithParams,
    /// An overlong UTF-8 sequence in escapes (`%C0%AE`): `.`, `/`, `\` to a lenient decoder.
    Overlong,
}

impl PathError {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::NotOriginForm => "not an absolute path",
            PathError::BadEscape => "invalid percent-encoding",
            PathError::EscapedSlash => "escaped slash or backslash",
            PathError::Backslash => "backslash",
            PathError::Nul => "escaped NUL",
            PathError::AboveRoot => "dot segment above the root",
            PathError::DotSegmentWithParams => "dot segment with parameters",
            PathError::Overlong => "overlong UTF-8 escape",
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Whether the escaped byte `v`, followed by `rest` of its segment, starts an overlong UTF-8 sequence (RFC 3629
/// §3): `C0`/`C1` (always overlong), `E0` then `80`–`9F`, `F0` then `80`–`8F`. Only escapes can form one (raw
/// bytes come from a `str`), and only escapes can continue one.
fn overlong(v: u8, rest: &[u8]) -> bool {
    let next = || match rest {
        [b'%', h, l, ..] => Some(hex_val(*h)? << 4 | hex_val(*l)?),
        _ => None,
    };
    match v {
        0xC0 | 0xC1 => true,
        0xE0 => next().is_some_and(|b| (0x80..=0x9F).contains(&b)),
        0xF0 => next().is_some_and(|b| (0x80..=0x8F).contains(&b)),
        _ => false,
    }
}

/// True when `path` needs no change: no `%`, no `\`, and no segment (other than the last) that is empty, and no
/// segment starting with `.`. One pass, no allocation; anything it is unsure of goes to the full normaliser.
fn already_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut prev = b'/';
    for &b in &path[1..] {
        match b {
            b'%' | b'\\' => return false,
            b'/' | b'.' if prev == b'/' => return false,
            _ => {}
        }
        prev = b;
    }
    true
}

/// Normalises `path` (see the module documentation).
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if already_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    // `out` always starts with `/`; each segment is appended as `/seg`, so popping a segment is truncating to the
    // last `/`. `trailing` records whether the path ends in a separator (an empty last segment, or a dot segment).
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut seg: Vec<u8> = Vec::with_capacity(32);
    let mut trailing = true;
    for raw in bytes[1..].split(|&b| b == b'/') {
        seg.clear();
        // Whether the segment has a `;` (raw or escaped), and the length of what precedes the first one.
        let mut before_param: Option<usize> = None;
        let mut i = 0;
        while i < raw.len() {
            let b = raw[i];
            match b {
                b'%' => {
                    let (Some(hi), Some(lo)) =
                        (raw.get(i + 1).copied().and_then(hex_val), raw.get(i + 2).copied().and_then(hex_val))
                    else {
                        return Err(PathError::BadEscape);
                    };
                    let v = hi << 4 | lo;
                    if is_unreserved(v) {
                        seg.push(v);
                    } else {
                        match v {
                            0 => return Err(PathError::Nul),
                            _ if overlong(v, &raw[i + 3..]) => return Err(PathError::Overlong),
                            b'/' | b'\\' if slashes == EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                            b';' if before_param.is_none() => before_param = Some(seg.len()),
                            _ => {}
                        }
                        seg.extend_from_slice(&[b'%', HEX_UPPER[usize::from(hi)], HEX_UPPER[usize::from(lo)]]);
                    }
                    i += 3;
                }
                b'\\' => return Err(PathError::Backslash),
                _ => {
                    if b == b';' && before_param.is_none() {
                        before_param = Some(seg.len());
                    }
                    seg.push(b);
                    i += 1;
                }
            }
        }
        match seg.as_slice() {
            // Merged slash (an empty segment) or `.`: nothing appended, but the path now ends in a separator.
            b"" | b"." => trailing = true,
            b".." => {
                if out.is_empty() {
                    return Err(PathError::AboveRoot);
                }
                let cut = out.iter().rposition(|&b| b == b'/').expect("segments start with '/'");
                out.truncate(cut);
                trailing = true;
            }
            s => {
                if let Some(n) = before_param
                    && matches!(&s[..n], b"." | b"..")
                {
                    return Err(PathError::DotSegmentWithParams);
                }
                out.push(b'/');
                out.extend_from_slice(s);
                trailing = false;
            }
        }
    }
    if trailing {
        out.push(b'/');
    }
    // Only ASCII was changed (escapes decoded to unreserved ASCII, hex upper-cased, separators): the bytes kept
    // are whole UTF-8 sequences from a `str`.
    Ok(Cow::Owned(String::from_utf8(out).expect("normalising keeps UTF-8 intact")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, EscapedSlashes::Reject).map(Cow::into_owned)
    }

    fn keep(p: &str) -> Result<String, PathError> {
        normalize(p, EscapedSlashes::Keep).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/v1", "/v1/", "/v1/orders/42", "/a;b=c/d", "/x.y/z.", "/é/ü", "/a-b_c~d"] {
            assert!(matches!(normalize(p, EscapedSlashes::Reject), Ok(Cow::Borrowed(q)) if q == p), "{p}");
        }
    }

    #[test]
    fn the_issue_reproductions_leave_the_scope() {
        assert_eq!(n("/v1/../admin/secret.txt").as_deref(), Ok("/admin/secret.txt"));
        assert_eq!(n("/v1/%2e%2e/admin/secret.txt").as_deref(), Ok("/admin/secret.txt"));
        assert_eq!(n("/v1/%2E%2E/admin/secret.txt").as_deref(), Ok("/admin/secret.txt"));
        assert_eq!(n("/v1/..%2fadmin/secret.txt"), Err(PathError::EscapedSlash));
        assert_eq!(n("/v1/..%2Fadmin/secret.txt"), Err(PathError::EscapedSlash));
        assert_eq!(keep("/v1/..%2fadmin/secret.txt").as_deref(), Ok("/v1/..%2Fadmin/secret.txt"));
    }

    #[test]
    fn dot_segments() {
        for (input, want) in [
            ("/.", "/"),
            ("/./", "/"),
            ("/a/.", "/a/"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/a/..", "/"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/a/.b/..c/c..", "/a/.b/..c/c.."),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/%2e/b", "/a/b"),
            ("/a/.%2E/b", "/b"),
            ("/a/%2e./", "/"),
        ] {
            assert_eq!(n(input).as_deref(), Ok(want), "{input}");
        }
        for p in ["/..", "/../a", "/a/../..", "/a/../../b", "/%2e%2e", "/a/./../.."] {
            assert_eq!(n(p), Err(PathError::AboveRoot), "{p}");
        }
    }

    #[test]
    fn slashes_are_merged_before_dot_segments() {
        assert_eq!(n("//").as_deref(), Ok("/"));
        assert_eq!(n("/a//b").as_deref(), Ok("/a/b"));
        assert_eq!(n("/a//b//").as_deref(), Ok("/a/b/"));
        // An app that merges slashes would read `/v1//../admin` as `/admin`, and so do we (not `/v1/admin`).
        assert_eq!(n("/v1//../admin").as_deref(), Ok("/admin"));
        assert_eq!(n("//v1/../../admin"), Err(PathError::AboveRoot));
    }

    #[test]
    fn escapes() {
        assert_eq!(n("/%7Euser/%41%62%2D%5f%2e%30").as_deref(), Ok("/~user/Ab-_.0"));
        assert_eq!(n("/a%20b/%e2%82%ac/%3f%23%25").as_deref(), Ok("/a%20b/%E2%82%AC/%3F%23%25"));
        // `%25` stays `%25`: decoding is done once.
        assert_eq!(n("/%252e%252e/x").as_deref(), Ok("/%252e%252e/x"));
        for p in ["/%", "/%2", "/%zz", "/a%g0", "/%%30%30", "/x%"] {
            assert_eq!(n(p), Err(PathError::BadEscape), "{p}");
        }
        assert_eq!(n("/a%00b"), Err(PathError::Nul));
        assert_eq!(keep("/a%00b"), Err(PathError::Nul));
        for p in ["/a%2fb", "/a%2Fb", "/a%5cb", "/a%5Cb"] {
            assert_eq!(n(p), Err(PathError::EscapedSlash), "{p}");
        }
        assert_eq!(keep("/a%2fb/%5c").as_deref(), Ok("/a%2Fb/%5C"));
        // Kept escaped slashes do not separate segments: `..%2F` is not a dot segment.
        assert_eq!(keep("/v1/..%2f..%2fadmin").as_deref(), Ok("/v1/..%2F..%2Fadmin"));
        assert_eq!(n("/a\\b"), Err(PathError::Backslash));
        assert_eq!(keep("/a\\b"), Err(PathError::Backslash));
    }

    #[test]
    fn overlong_utf8_escapes_are_refused() {
        // `.`, `/` and `\` in overlong forms: a lenient UTF-8 decoder (old Tomcat, IIS) reads them as such.
        for p in [
            "/v1/%c0%ae%c0%ae/admin",
            "/v1/%C0%AF..",
            "/v1/..%c1%9cadmin",
            "/%c0",
            "/%C1%BF",
            "/v1/%e0%80%ae",
            "/v1/%E0%9F%BF",
            "/v1/%f0%80%80%ae",
            "/v1/%F0%8F%BF%BF",
        ] {
            assert_eq!(n(p), Err(PathError::Overlong), "{p}");
            assert_eq!(keep(p), Err(PathError::Overlong), "{p}");
        }
        // The shortest forms of the same lead bytes are ordinary characters.
        for p in ["/%C2%A0", "/%E0%A0%80", "/%F0%90%80%80", "/%E0", "/%E0x", "/%F0%A0", "/%DF%BF", "/%E1%80%80"] {
            assert_eq!(n(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn parameters() {
        assert_eq!(n("/a;x=1/b;y").as_deref(), Ok("/a;x=1/b;y"));
        assert_eq!(n("/a;x/../b").as_deref(), Ok("/b"));
        assert_eq!(n("/a/;x").as_deref(), Ok("/a/;x"));
        for p in ["/v1/..;/admin", "/v1/..;x/admin", "/v1/.;/x", "/v1/%2e%2e;/admin", "/v1/..%3b/admin", "/v1/.%3Bx"] {
            assert_eq!(n(p), Err(PathError::DotSegmentWithParams), "{p}");
        }
        // Only what precedes the first `;` counts.
        assert_eq!(n("/a/x;..").as_deref(), Ok("/a/x;.."));
        assert_eq!(n("/a/...;x").as_deref(), Ok("/a/...;x"));
    }

    #[test]
    fn not_origin_form() {
        for p in ["", "*", "a/b", "example.com:443", "%2F"] {
            assert_eq!(n(p), Err(PathError::NotOriginForm), "{p}");
        }
    }

    mod props {
        use super::*;
        use crate::decision::path_reference::{app_view, model};
        use portcullis_table::RouteScope;
        use proptest::prelude::*;

        /// Paths built from the pieces that matter: separators, dots, escapes of every kind, parameters.
        fn path() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("/".to_string()),
                Just("//".to_string()),
                Just(".".to_string()),
                Just("..".to_string()),
                Just("/..".to_string()),
                Just("/.".to_string()),
                Just("v1".to_string()),
                Just("admin".to_string()),
                Just(";".to_string()),
                Just(";x=1".to_string()),
                Just("%2e".to_string()),
                Just("%2E".to_string()),
                Just("%2f".to_string()),
                Just("%5C".to_string()),
                Just("%3b".to_string()),
                Just("%25".to_string()),
                Just("%00".to_string()),
                Just("%".to_string()),
                Just("%4".to_string()),
                Just("%7e".to_string()),
                Just("\\".to_string()),
                Just("é".to_string()),
                "[a-z0-9._~-]{1,4}",
                (any::<u8>()).prop_map(|b| format!("%{b:02x}")),
            ];
            (any::<bool>(), proptest::collection::vec(piece, 0..12))
                .prop_map(|(lead, v)| if lead { format!("/{}", v.concat()) } else { v.concat() })
        }

        fn slashes() -> impl Strategy<Value = EscapedSlashes> {
            prop_oneof![Just(EscapedSlashes::Reject), Just(EscapedSlashes::Keep)]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

            #[test]
            fn equals_the_reference_model(p in path(), s in slashes()) {
                // Which refusal is reported first may differ (the model scans in several passes); whether and how
                // the path is accepted may not.
                prop_assert_eq!(normalize(&p, s).map(Cow::into_owned).ok(), model(&p, s).ok(), "{:?}", p);
            }

            #[test]
            fn is_idempotent(p in path(), s in slashes()) {
                if let Ok(once) = normalize(&p, s) {
                    let twice = normalize(&once, s).map(Cow::into_owned);
                    prop_assert_eq!(twice.as_deref(), Ok(once.as_ref()), "{:?}", p);
                    prop_assert!(matches!(normalize(&once, s), Ok(Cow::Borrowed(_))) || once.contains('%')
                        || once.contains("/."), "normal form not recognised as such: {:?}", once);
                }
            }

            #[test]
            fn arbitrary_strings_never_panic(p in "\\PC{0,40}", s in slashes()) {
                let _ = normalize(&p, s);
                prop_assert_eq!(normalize(&p, s).map(Cow::into_owned).ok(), model(&p, s).ok());
            }

            /// Whenever a scope admits the normalised path, a lenient application's reading of that same path is
            /// inside the scope too: decoding, backslashes, parameters, merged slashes and dot segments cannot
            /// take it out.
            #[test]
            fn the_app_stays_inside_the_admitted_prefix(p in path(), prefix in prop_oneof![Just("/v1"), Just("/v1/admin"), Just("/admin")]) {
                let scope = RouteScope { path_prefix: prefix.to_string(), methods: vec![] };
                if let Ok(norm) = normalize(&p, EscapedSlashes::Reject)
                    && scope.matches("GET", &norm)
                {
                    let want: Vec<&str> = prefix.split('/').skip(1).collect();
                    let got = app_view(&norm);
                    prop_assert!(got.len() >= want.len() && got.iter().zip(&want).all(|(a, b)| a == b),
                        "{:?} → {:?} admitted by {} but the app reads {:?}", p, norm, prefix, got);
                }
            }
        }
    }
}
