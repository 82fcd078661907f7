//! The key edits of `kubectl portcullis keys …` on an ApiClient's `spec.keys`, and what `keys show` prints. Pure:
//! JSON in, JSON out (the caller reads and writes the object with its resourceVersion).

use anyhow::{Result, bail};
use jiff::Timestamp;
use serde_json::{Value, json};

/// One entry of `spec.keys`, as `keys show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    pub name: Option<String>,
    /// `generated` or `secret NAME/KEY`.
    pub source: String,
    /// The Secret holding the key and its data key, when known.
    pub secret: Option<(String, String)>,
    pub fingerprint: Option<String>,
    pub expires_at: Option<String>,
}

/// The entries of `spec.keys` of ApiClient `obj` (its whole JSON), with what its status says of generated keys.
pub fn views(obj: &Value) -> Vec<KeyView> {
    let generated = obj.pointer("/status/generatedKeys").and_then(Value::as_array).cloned().unwrap_or_default();
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    entries(obj)
        .iter()
        .map(|k| {
            let name = s(k, "name");
            let expires_at = s(k, "expiresAt");
            match k.get("secretRef") {
                Some(r) => {
                    let (n, d) = (s(r, "name").unwrap_or_default(), s(r, "key").unwrap_or_default());
                    KeyView {
                        name,
                        source: format!("secret {n}/{d}"),
                        secret: Some((n, d)),
                        fingerprint: None,
                        expires_at,
                    }
                }
                None => {
                    let status = generated.iter().find(|g| name.is_some() && s(g, "name") == name);
                    KeyView {
                        source: "generated".into(),
                        secret: status.and_then(|g| s(g, "secret")).map(|n| (n, "key".to_string())),
                        fingerprint: status.and_then(|g| s(g, "fingerprint")),
                        name,
                        expires_at,
                    }
                }
            }
        })
        .collect()
}

fn entries(obj: &Value) -> Vec<Value> {
    obj.pointer("/spec/keys").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn keys_mut(spec: &mut Value) -> Result<&mut Vec<Value>> {
    let Some(map) = spec.as_object_mut() else { bail!("spec is not an object") };
    let keys = map.entry("keys").or_insert_with(|| json!([]));
    match keys.as_array_mut() {
        Some(a) => Ok(a),
        None => bail!("spec.keys is not a list"),
    }
}

fn names(keys: &[Value]) -> Vec<String> {
    keys.iter().filter_map(|k| k.get("name").and_then(Value::as_str).map(str::to_string)).collect()
}

/// A name for a new key: `k<N>`, N one more than the largest `k<number>` in use (so names are never reused while
/// the old entries are listed, and read in order of creation).
pub fn next_name(spec: &Value) -> String {
    let keys = spec.get("keys").and_then(Value::as_array).cloned().unwrap_or_default();
    let n = names(&keys).iter().filter_map(|n| n.strip_prefix('k')?.parse::<u64>().ok()).max().unwrap_or(0);
    format!("k{}", n + 1)
}

/// Adds `{name, generate: {}}` to `spec.keys`.
pub fn add_generated(spec: &mut Value, name: &str, expires_at: Option<Timestamp>) -> Result<()> {
    let keys = keys_mut(spec)?;
    if names(keys).iter().any(|n| n == name) {
        bail!("spec.keys already has a key named {name:?}; pick another with --name");
    }
    let mut entry = json!({"name": name, "generate": {}});
    if let Some(at) = expires_at {
        entry["expiresAt"] = json!(rfc3339(at));
    }
    keys.push(entry);
    Ok(())
}

/// Sets `expiresAt` on the entries named `which` (every named entry except `keep` when `which` is empty).
/// Returns the names changed. An entry that already expires sooner keeps its expiry.
pub fn expire(spec: &mut Value, which: &[String], keep: &str, at: Timestamp) -> Result<Vec<String>> {
    let keys = keys_mut(spec)?;
    check_named(keys, which)?;
    let mut changed = Vec::new();
    for k in keys.iter_mut() {
        let Some(name) = k.get("name").and_then(Value::as_str).map(str::to_string) else { continue };
        let chosen = if which.is_empty() { name != keep } else { which.contains(&name) };
        if !chosen {
            continue;
        }
        let sooner = k
            .get("expiresAt")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Timestamp>().ok())
            .is_some_and(|e| e <= at);
        if !sooner {
            k["expiresAt"] = json!(rfc3339(at));
            changed.push(name);
        }
    }
    Ok(changed)
}

/// Removes the entries named `which` (every named entry except `keep` when `which` is empty); returns their names.
/// Refuses to remove the last key unless `allow_none`.
pub fn remove(spec: &mut Value, which: &[String], keep: &str, allow_none: bool) -> Result<Vec<String>> {
    let keys = keys_mut(spec)?;
    check_named(keys, which)?;
    let chosen = |k: &Value| {
        k.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| if which.is_empty() { n != keep } else { which.iter().any(|w| w == n) })
    };
    let removed: Vec<String> =
        keys.iter().filter(|k| chosen(k)).filter_map(|k| k["name"].as_str().map(str::to_string)).collect();
    if removed.len() == keys.len() && !allow_none {
        bail!(
            "that would remove every key of the client (it could no longer call anything); add a key first \
             (`kubectl portcullis keys create`) or pass --allow-no-keys"
        );
    }
    keys.retain(|k| !chosen(k));
    Ok(removed)
}

/// Entries of `spec.keys` without a name (a `secretRef` may have none): the key commands cannot address them.
pub fn unnamed(spec: &Value) -> usize {
    spec.get("keys").and_then(Value::as_array).map_or(0, |a| a.iter().filter(|k| k.get("name").is_none()).count())
}

fn check_named(keys: &[Value], which: &[String]) -> Result<()> {
    let have = names(keys);
    for w in which {
        if !have.contains(w) {
            let list = if have.is_empty() { "none".to_string() } else { have.join(", ") };
            bail!("spec.keys has no key named {w:?} (named keys: {list}; `kubectl portcullis keys show` lists them)");
        }
    }
    Ok(())
}

/// Kubernetes `Time`: RFC 3339, seconds precision, UTC.
pub fn rfc3339(at: Timestamp) -> String {
    at.round(jiff::Unit::Second)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| at.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Value {
        json!({"usagePlans": ["p"], "keys": [
            {"name": "k1", "generate": {}},
            {"name": "legacy", "secretRef": {"name": "s", "key": "api-key"}},
        ]})
    }

    #[test]
    fn new_names_follow_the_largest_kn() {
        assert_eq!(next_name(&spec()), "k2");
        assert_eq!(next_name(&json!({"keys": [{"name": "k9"}, {"name": "k10"}, {"name": "x"}]})), "k11");
        assert_eq!(next_name(&json!({})), "k1");
    }

    #[test]
    fn adding_refuses_a_taken_name() {
        let mut s = spec();
        add_generated(&mut s, "k2", None).unwrap();
        assert_eq!(s["keys"][2], json!({"name": "k2", "generate": {}}));
        let e = add_generated(&mut s, "k1", None).unwrap_err().to_string();
        assert!(e.contains("already has a key named \"k1\""), "{e}");
        let mut empty = json!({});
        add_generated(&mut empty, "k1", Some("2027-01-01T00:00:00.7Z".parse().unwrap())).unwrap();
        assert_eq!(empty["keys"][0]["expiresAt"], "2027-01-01T00:00:01Z");
    }

    #[test]
    fn expiring_sets_the_others_and_keeps_a_sooner_expiry() {
        let at: Timestamp = "2027-01-01T00:00:00Z".parse().unwrap();
        let mut s = spec();
        assert_eq!(expire(&mut s, &[], "k1", at).unwrap(), vec!["legacy"]);
        assert_eq!(s["keys"][1]["expiresAt"], "2027-01-01T00:00:00Z");
        assert!(s["keys"][0].get("expiresAt").is_none());
        let later: Timestamp = "2028-01-01T00:00:00Z".parse().unwrap();
        assert!(expire(&mut s, &["legacy".into()], "", later).unwrap().is_empty(), "a sooner expiry stays");
        assert!(expire(&mut s, &["nope".into()], "", at).unwrap_err().to_string().contains("named keys: k1, legacy"));
    }

    #[test]
    fn removing_names_what_went_and_never_the_last_key_by_accident() {
        let mut s = spec();
        assert_eq!(remove(&mut s, &["legacy".into()], "", false).unwrap(), vec!["legacy"]);
        assert_eq!(s["keys"].as_array().unwrap().len(), 1);
        let e = remove(&mut s, &["k1".into()], "", false).unwrap_err().to_string();
        assert!(e.contains("every key"), "{e}");
        assert_eq!(remove(&mut s, &["k1".into()], "", true).unwrap(), vec!["k1"]);
        let mut s = spec();
        assert_eq!(remove(&mut s, &[], "k1", false).unwrap(), vec!["legacy"], "all but the one kept");
    }

    #[test]
    fn views_join_the_spec_with_the_generated_keys_status() {
        let obj = json!({"spec": spec(), "status": {"generatedKeys": [
            {"name": "k1", "secret": "acme-key-k1", "fingerprint": "sha256:0123456789ab"}]}});
        let v = views(&obj);
        assert_eq!(v[0].secret, Some(("acme-key-k1".into(), "key".into())));
        assert_eq!(v[0].fingerprint.as_deref(), Some("sha256:0123456789ab"));
        assert_eq!((v[1].source.as_str(), v[1].fingerprint.as_ref()), ("secret s/api-key", None));
    }
}
