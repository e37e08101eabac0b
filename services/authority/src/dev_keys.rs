//! Keys the embedded node accepts besides its development key (which has every scope), so a
//! gateway, a support tool or a test can call it with only the scopes it needs:
//!
//! - `TOLLGATE_DEV_EXTRA_KEYS`: keys in clear, `name:scope[+scope]:secret` separated by commas
//!   (`gateway:enforce:…,support:read:…`), hashed when read;
//! - `--keys FILE`: `[[api_keys]]` entries (name, sha256, scope), the same as in the `serve`
//!   configuration, so the file holds digests only.
//!
//! Every entry is checked before the node starts; an error names the variable or the file and
//! the entry, never a secret.

use std::path::{Path, PathBuf};

use tollgate_serve::auth::{
    key_digest, key_entries, ApiKeyConfig, KeyEntry, Scope, API_KEYS_MAX, AUTHORIZATION_LEN_MAX,
};

/// The environment variable holding extra keys in clear.
pub const EXTRA_KEYS_ENV: &str = "TOLLGATE_DEV_EXTRA_KEYS";
/// Shortest secret accepted, in bytes: a development key still guards a ledger.
pub const SECRET_LEN_MIN: usize = 16;
/// Longest secret accepted, in bytes: what fits in `authorization: Bearer <key>`.
pub const SECRET_LEN_MAX: usize = AUTHORIZATION_LEN_MAX - "Bearer ".len();
/// Longest key name, in bytes (names appear in logs and the audit).
pub const NAME_LEN_MAX: usize = 64;
/// Largest `--keys` file read, in bytes.
pub const KEYS_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// The development key's name; extra keys may not take it.
pub const DEV_KEY_NAME: &str = "dev";

#[derive(Debug, thiserror::Error)]
pub enum DevKeysError {
    /// `entry` is 1-based; `name` is the entry's name when it could be read.
    #[error("{EXTRA_KEYS_ENV}: entry {entry}{name}: {problem}")]
    Entry {
        entry: usize,
        name: String,
        problem: String,
    },
    #[error("{EXTRA_KEYS_ENV}: {count} entries, at most {API_KEYS_MAX}")]
    TooMany { count: usize },
    #[error("--keys {path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("extra keys: {0}")]
    Clash(String),
}

/// The keys of `TOLLGATE_DEV_EXTRA_KEYS`: one entry per scope of each key, as the node's key
/// ring holds them.
pub fn parse_extra_keys(text: &str) -> Result<Vec<KeyEntry>, DevKeysError> {
    let entries: Vec<&str> = text.split(',').collect();
    if entries.len() > API_KEYS_MAX {
        return Err(DevKeysError::TooMany {
            count: entries.len(),
        });
    }
    let mut keys = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        keys.extend(parse_entry(index + 1, entry.trim())?);
    }
    Ok(keys)
}

fn parse_entry(entry: usize, text: &str) -> Result<Vec<KeyEntry>, DevKeysError> {
    let mut parts = text.splitn(3, ':');
    let (name, scopes, secret) = (parts.next(), parts.next(), parts.next());
    let named = name.filter(|name| is_name(name)).map(str::to_owned);
    let problem = |problem: &str| DevKeysError::Entry {
        entry,
        name: named
            .as_ref()
            .map(|name| format!(" ({name:?})"))
            .unwrap_or_default(),
        problem: problem.to_owned(),
    };
    let (Some(name), Some(scopes), Some(secret)) = (name, scopes, secret) else {
        return Err(problem("expected name:scope[+scope]:secret"));
    };
    if !is_name(name) {
        return Err(problem(&format!(
            "the name must be 1 to {NAME_LEN_MAX} characters of A-Z a-z 0-9 . _ -"
        )));
    }
    if name == DEV_KEY_NAME {
        return Err(problem("the name \"dev\" is the development key's"));
    }
    let scopes = parse_scopes(scopes).map_err(|why| problem(&why))?;
    check_secret(secret).map_err(|why| problem(&why))?;
    let digest = key_digest(secret);
    Ok(scopes
        .into_iter()
        .map(|scope| KeyEntry {
            name: name.to_owned(),
            digest,
            scope,
        })
        .collect())
}

fn is_name(name: &str) -> bool {
    (1..=NAME_LEN_MAX).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse_scopes(text: &str) -> Result<Vec<Scope>, String> {
    let mut scopes = Vec::new();
    for name in text.split('+') {
        let scope = Scope::from_name(name).ok_or_else(|| {
            format!("unknown scope {name:?}; scopes are enforce, read and admin, joined by +")
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    Ok(scopes)
}

fn check_secret(secret: &str) -> Result<(), String> {
    if !(SECRET_LEN_MIN..=SECRET_LEN_MAX).contains(&secret.len()) {
        return Err(format!(
            "the secret must be {SECRET_LEN_MIN} to {SECRET_LEN_MAX} bytes"
        ));
    }
    // It travels in a header and a comma ends the entry.
    if !secret.chars().all(|c| c.is_ascii_graphic() && c != ',') {
        return Err("the secret must be printable ASCII without spaces or commas".into());
    }
    Ok(())
}

/// The `[[api_keys]]` entries of a `--keys` file.
pub fn load_keys_file(path: &Path) -> Result<Vec<KeyEntry>, DevKeysError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct KeysFile {
        #[serde(default)]
        api_keys: Vec<ApiKeyConfig>,
    }
    let failed = |problem: String| DevKeysError::File {
        path: path.to_path_buf(),
        problem,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| failed(e.to_string()))?
        .len();
    if size > KEYS_FILE_BYTES_MAX {
        return Err(failed(format!(
            "{size} bytes, at most {KEYS_FILE_BYTES_MAX}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    let file: KeysFile = toml::from_str(&text).map_err(|e| failed(e.to_string()))?;
    if let Some(index) = file
        .api_keys
        .iter()
        .position(|key| key.name == DEV_KEY_NAME || !is_name(&key.name))
    {
        return Err(failed(format!(
            "api_keys[{index}].name: must be 1 to {NAME_LEN_MAX} characters of \
             A-Z a-z 0-9 . _ - and not \"dev\""
        )));
    }
    key_entries(&file.api_keys).map_err(failed)
}

/// Refuses extra keys that would make the ring ambiguous: one name for two keys, one key under
/// two names, or the development key again (its name would hide theirs in the audit).
pub fn check_distinct(dev_key: &str, extra: &[KeyEntry]) -> Result<(), DevKeysError> {
    let dev_digest = key_digest(dev_key);
    for (index, key) in extra.iter().enumerate() {
        if key.digest == dev_digest {
            return Err(DevKeysError::Clash(format!(
                "{:?} is the development key itself",
                key.name
            )));
        }
        for other in &extra[..index] {
            if other.name == key.name && other.digest != key.digest {
                return Err(DevKeysError::Clash(format!(
                    "the name {:?} is given to two different keys",
                    key.name
                )));
            }
            if other.digest == key.digest && other.name != key.name {
                return Err(DevKeysError::Clash(format!(
                    "one key is named both {:?} and {:?}",
                    other.name, key.name
                )));
            }
        }
    }
    Ok(())
}

/// `name (scope+scope)` per key, in the order first given, for the start banner.
pub fn describe(keys: &[KeyEntry]) -> Vec<String> {
    let mut described: Vec<(String, Vec<&'static str>)> = Vec::new();
    for key in keys {
        match described.iter_mut().find(|(name, _)| *name == key.name) {
            Some((_, scopes)) if !scopes.contains(&key.scope.name()) => {
                scopes.push(key.scope.name())
            }
            Some(_) => {}
            None => described.push((key.name.clone(), vec![key.scope.name()])),
        }
    }
    described
        .into_iter()
        .map(|(name, scopes)| format!("{name} ({})", scopes.join("+")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    #[test]
    fn entries_give_one_key_per_scope() {
        let keys = parse_extra_keys(&format!(
            "gateway:enforce:{SECRET}, support:read+admin:{SECRET}:x"
        ))
        .unwrap();
        let summary: Vec<(String, Scope)> =
            keys.iter().map(|k| (k.name.clone(), k.scope)).collect();
        assert_eq!(
            summary,
            vec![
                ("gateway".into(), Scope::Enforce),
                ("support".into(), Scope::Read),
                ("support".into(), Scope::Admin),
            ]
        );
        assert_eq!(keys[1].digest, key_digest(&format!("{SECRET}:x")));
        assert_eq!(
            describe(&keys),
            vec!["gateway (enforce)", "support (read+admin)"]
        );
    }

    #[test]
    fn errors_name_the_variable_and_the_entry_and_never_the_secret() {
        let cases = [
            (
                format!("a:enforce:{SECRET},b:reed:{SECRET}"),
                "TOLLGATE_DEV_EXTRA_KEYS: entry 2 (\"b\"): unknown scope \"reed\"",
            ),
            (
                "a:enforce".to_owned(),
                "TOLLGATE_DEV_EXTRA_KEYS: entry 1 (\"a\"): expected name:scope[+scope]:secret",
            ),
            (
                "a:enforce:short".to_owned(),
                "TOLLGATE_DEV_EXTRA_KEYS: entry 1 (\"a\"): the secret must be 16",
            ),
            (
                format!("a b:read:{SECRET}"),
                "TOLLGATE_DEV_EXTRA_KEYS: entry 1: the name must be",
            ),
            (
                format!("dev:read:{SECRET}"),
                "TOLLGATE_DEV_EXTRA_KEYS: entry 1 (\"dev\"): the name \"dev\"",
            ),
            (
                format!("a:read:{SECRET},"),
                "TOLLGATE_DEV_EXTRA_KEYS: entry 2: expected",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_extra_keys(&text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{text:?}: {error}");
            assert!(!error.contains(SECRET), "{error}");
        }
    }

    #[test]
    fn clashing_keys_are_refused() {
        let keys = parse_extra_keys(&format!("a:read:{SECRET},b:enforce:{SECRET}")).unwrap();
        let error = check_distinct("the-dev-key-itself", &keys).unwrap_err();
        assert_eq!(
            error.to_string(),
            "extra keys: one key is named both \"a\" and \"b\""
        );
        let keys = parse_extra_keys(&format!("a:read:{SECRET}")).unwrap();
        assert!(check_distinct(SECRET, &keys).is_err());
        assert!(check_distinct("the-dev-key-itself", &keys).is_ok());
    }

    #[test]
    fn a_keys_file_holds_digests_and_errors_name_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let digest = hex::encode(key_digest(SECRET));
        std::fs::write(
            &path,
            format!(
                "[[api_keys]]\nname = \"gateway\"\nsha256 = \"{digest}\"\nscope = \"enforce\"\n"
            ),
        )
        .unwrap();
        let keys = load_keys_file(&path).unwrap();
        assert_eq!(
            (keys[0].digest, keys[0].scope),
            (key_digest(SECRET), Scope::Enforce)
        );
        std::fs::write(
            &path,
            "[[api_keys]]\nname = \"gateway\"\nsha256 = \"abc\"\nscope = \"enforce\"\n",
        )
        .unwrap();
        let error = load_keys_file(&path).unwrap_err().to_string();
        assert!(
            error.ends_with("api_keys[0].sha256: must be 64 hex digits"),
            "{error}"
        );
    }
}
