//! Reference models for [`super::path`], written for clarity rather than speed: the normaliser's unit tests, its
//! property tests and the `path` fuzz target check the single-pass [`normalize`](super::path::normalize) against
//! them. Compiled for tests and with the `fuzzing` feature only.

use super::path::{EscapedSlashes, PathError};

/// The straightforward model the single-pass normaliser is checked against: several passes over strings,
/// RFC 3986 §5.2.4 written out as the RFC states it, and the refusals as separate scans.
pub fn model(path: &str, slashes: EscapedSlashes) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    // Decode unreserved escapes, upper-case the rest.
    let b = path.as_bytes();
    let mut decoded = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = path.get(i + 1..i + 3).filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
            let Some(hex) = hex else { return Err(PathError::BadEscape) };
            let v = u8::from_str_radix(hex, 16).unwrap();
            if v == 0 {
                return Err(PathError::Nul);
            }
            let next = path
                .get(i + 3..i + 6)
                .and_then(|e| e.strip_prefix('%'))
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .map(|h| u8::from_str_radix(h, 16).unwrap());
            if matches!(v, 0xC0 | 0xC1)
                || (v == 0xE0 && next.is_some_and(|b| (0x80..=0x9F).contains(&b)))
                || (v == 0xF0 && next.is_some_and(|b| (0x80..=0x8F).contains(&b)))
            {
                return Err(PathError::Overlong);
            }
            if (v == b'/' || v == b'\\') && slashes == EscapedSlashes::Reject {
                return Err(PathError::EscapedSlash);
            }
            if v.is_ascii_alphanumeric() || "-._~".contains(v as char) {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            let c = path[i..].chars().next().unwrap();
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    while decoded.contains("//") {
        decoded = decoded.replace("//", "/");
    }
    for seg in decoded.split('/') {
        let head = seg.replace("%3B", ";");
        let head = head.split(';').next().unwrap();
        if seg != head && (head == "." || head == "..") {
            return Err(PathError::DotSegmentWithParams);
        }
    }
    // Climbing above the root: count depth segment by segment.
    let mut depth = 0i64;
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(PathError::AboveRoot);
                }
            }
            _ => depth += 1,
        }
    }
    Ok(remove_dot_segments(&decoded))
}

/// RFC 3986 §5.2.4, step by step.
fn remove_dot_segments(input: &str) -> String {
    let mut input = input.to_string();
    let mut output = String::new();
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../").or_else(|| input.strip_prefix("./")) {
            input = rest.to_string();
        } else if input.starts_with("/./") {
            input = input[2..].to_string();
        } else if input == "/." {
            input = "/".to_string();
        } else if input.starts_with("/../") || input == "/.." {
            input = if input == "/.." { "/".to_string() } else { input[3..].to_string() };
            match output.rfind('/') {
                Some(i) => output.truncate(i),
                None => output.clear(),
            }
        } else if input == "." || input == ".." {
            input.clear();
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input = input[end..].to_string();
        }
    }
    output
}

/// How a lenient application reads a path: decode every escape once, split on `/` and `\`, drop `;`
/// parameters, merge slashes, resolve dot segments clamping at the root.
pub fn app_view(path: &str) -> Vec<String> {
    let mut bytes = Vec::new();
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = path.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            bytes.push(v);
            i += 3;
            continue;
        }
        bytes.push(b[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&bytes).into_owned();
    let mut segs: Vec<String> = Vec::new();
    for seg in decoded.split(['/', '\\']) {
        let seg = seg.split(';').next().unwrap();
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s.to_string()),
        }
    }
    segs
}
