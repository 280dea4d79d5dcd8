//! VM identifiers. An id names files under the runtime and data directories,
//! so its alphabet is closed: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, which can
//! never contain a path separator or be `.`/`..`.

use std::fmt;

/// Longest accepted VM id, in bytes.
pub const MAX_VM_ID_LEN: usize = 64;

/// A validated VM identifier.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(String);

/// Why a string is not a valid VM id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmIdError {
    /// The id is empty.
    #[error("must not be empty")]
    Empty,
    /// The id is longer than [`MAX_VM_ID_LEN`].
    #[error("must be at most {MAX_VM_ID_LEN} bytes, got {0}")]
    TooLong(usize),
    /// The id contains a character outside the allowed alphabet.
    #[error("must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")]
    BadCharacter,
}

impl VmId {
    /// Parses and validates an id.
    pub fn parse(s: &str) -> Result<Self, VmIdError> {
        let bytes = s.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(VmIdError::Empty);
        };
        if bytes.len() > MAX_VM_ID_LEN {
            return Err(VmIdError::TooLong(bytes.len()));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(VmIdError::BadCharacter);
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(VmIdError::BadCharacter);
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "vm-1", "A.b_c-9", &"x".repeat(64)] {
            assert_eq!(
                VmId::parse(ok).map(|v| v.as_str().to_owned()),
                Ok(ok.to_owned())
            );
        }
    }

    #[test]
    fn rejects_escapes_and_bad_shapes() {
        assert_eq!(VmId::parse(""), Err(VmIdError::Empty));
        assert_eq!(VmId::parse(&"x".repeat(65)), Err(VmIdError::TooLong(65)));
        for bad in [".", "..", "../etc", "a/b", "-x", "_x", "a b", "é", "a\0"] {
            assert_eq!(VmId::parse(bad), Err(VmIdError::BadCharacter), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn valid_ids_never_contain_path_separators(s in "\\PC{0,80}") {
            if let Ok(id) = VmId::parse(&s) {
                prop_assert!(!id.as_str().contains('/'));
                prop_assert!(id.as_str() != "." && id.as_str() != "..");
                prop_assert!(id.as_str().len() <= MAX_VM_ID_LEN);
            }
        }
    }
}
