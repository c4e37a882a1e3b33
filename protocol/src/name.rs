use std::{fmt, path::PathBuf, str::FromStr};

use crate::ProtocolError;

/// The longest file name, in bytes, that can be asked for or listed.
pub const MAX_NAME_LEN: usize = 1024;

/// A file name that can only ever point inside the folder it is joined to:
/// relative, `/`-separated, no `.` or `..` parts, no empty parts, no control
/// characters and no backslashes. Symlinks are the server's business; this
/// type guarantees the name alone cannot climb out.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileName(String);

impl FileName {
    pub fn new(name: &str) -> Result<Self, ProtocolError> {
        let bad = |reason| ProtocolError::BadName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad("it is longer than 1024 bytes"));
        }
        if name.starts_with('/') {
            return Err(bad("it is an absolute path"));
        }
        if name.chars().any(char::is_control) {
            return Err(bad("it contains a control character"));
        }
        if name.contains('\\') {
            return Err(bad("it contains a backslash"));
        }
        for part in name.split('/') {
            match part {
                "" => return Err(bad("it has an empty path component")),
                "." | ".." => return Err(bad("it has a '.' or '..' path component")),
                _ => {}
            }
        }
        Ok(FileName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a relative path, to be joined to the served folder.
    pub fn to_path(&self) -> PathBuf {
        self.0.split('/').collect()
    }

    /// The name as one wire token: `%`, space and control bytes become `%XX`.
    pub fn encode(&self) -> String {
        percent_encode(&self.0)
    }

    /// Parses a wire token: undoes `%XX` escapes, then checks the name.
    /// Escapes cannot smuggle anything past the check (`%2e%2e/x` is `../x`).
    pub fn decode(token: &str) -> Result<Self, ProtocolError> {
        FileName::new(&percent_decode(token, "escape in file name")?)
    }
}

/// One wire token from any text: `%`, space and control bytes become `%XX`.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '%' || c == ' ' || c.is_ascii_control() {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Undoes `percent_encode`; `what` names the value in errors.
pub(crate) fn percent_decode(token: &str, what: &'static str) -> Result<String, ProtocolError> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| ProtocolError::invalid(what, token))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ProtocolError::invalid(what, token))
}

impl FromStr for FileName {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FileName::new(s)
    }
}

/// Quoted and escaped like a string, so that names in messages and logs
/// show their spaces and odd characters.
impl fmt::Debug for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_names_are_accepted() {
        for name in [
            "notes.txt",
            "a b.txt",
            "dir/sub/x.bin",
            "ünïcödé.txt",
            ".hidden",
            "..x",
            "100%",
        ] {
            assert_eq!(FileName::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn names_that_escape_are_rejected() {
        for name in [
            "",
            "../x",
            "..",
            ".",
            "/etc/passwd",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\\..\\b",
            "a\nb",
            "nul\0",
            "./x",
        ] {
            assert!(
                matches!(FileName::new(name), Err(ProtocolError::BadName { .. })),
                "{name:?}"
            );
        }
        assert!(FileName::new(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(FileName::new(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn escapes_cannot_smuggle_traversal() {
        for token in [
            "%2e%2e/x",
            "%2E%2E%2Fetc%2Fpasswd",
            "%2Fetc",
            "a%00b",
            "..%2fx",
        ] {
            assert!(FileName::decode(token).is_err(), "{token:?}");
        }
    }

    #[test]
    fn bad_escapes_are_rejected() {
        for token in ["%", "%4", "%zz", "a%+1", "%ff"] {
            assert!(FileName::decode(token).is_err(), "{token:?}");
        }
    }

    #[test]
    fn spaces_and_percent_are_escaped() {
        let name = FileName::new("50% off.txt").unwrap();
        assert_eq!(name.encode(), "50%25%20off.txt");
        assert_eq!(FileName::decode("50%25%20off.txt").unwrap(), name);
    }

    #[test]
    fn display_is_the_name_and_debug_is_quoted() {
        let name = FileName::new("a b\"c.txt").unwrap();
        assert_eq!(name.to_string(), "a b\"c.txt");
        assert_eq!(format!("{name:?}"), r#""a b\"c.txt""#);
    }

    #[test]
    fn path_has_one_component_per_part() {
        let path = FileName::new("a/b/c.txt").unwrap().to_path();
        assert_eq!(path.components().count(), 3);
    }

    proptest! {
        #[test]
        fn decode_never_panics(token in "\\PC{0,64}") {
            let _ = FileName::decode(&token);
        }

        #[test]
        fn encode_then_decode_is_identity(name in "[^/\\\\\\p{Cc}]{1,20}(/[^/\\\\\\p{Cc}]{1,20}){0,3}") {
            if let Ok(name) = FileName::new(&name) {
                let token = name.encode();
                prop_assert!(!token.contains(' '));
                prop_assert_eq!(FileName::decode(&token).unwrap(), name);
            }
        }
    }
}
