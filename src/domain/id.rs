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

    /// The grammar as a regex, independent of `parse`'s hand-written checks.
    fn grammar_accepts(s: &str) -> bool {
        let mut chars = s.chars();
        let Some(first) = chars.next() else {
            return false;
        };
        s.len() <= MAX_VM_ID_LEN
            && first.is_ascii_alphanumeric()
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }

    /// One edit of a string: insert, replace or delete a character (any
    /// Unicode scalar, weighted towards the characters that matter), or
    /// repeat it past the length limit.
    #[derive(Debug, Clone)]
    enum Mutation {
        Insert(usize, char),
        Replace(usize, char),
        Delete(usize),
        Repeat(usize),
    }

    fn arb_char() -> impl Strategy<Value = char> {
        prop_oneof![
            3 => prop::sample::select(vec!['/', '.', '_', '-', ' ', '\0', '\\', 'é', 'Ａ', '\n', ':', '%']),
            2 => prop::char::range('a', 'z'),
            1 => any::<char>(),
        ]
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), arb_char()).prop_map(|(i, c)| Mutation::Insert(i, c)),
            (any::<usize>(), arb_char()).prop_map(|(i, c)| Mutation::Replace(i, c)),
            any::<usize>().prop_map(Mutation::Delete),
            (2usize..5).prop_map(Mutation::Repeat),
        ]
    }

    fn apply(s: &str, m: &Mutation) -> String {
        let mut chars: Vec<char> = s.chars().collect();
        match *m {
            Mutation::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
            Mutation::Replace(i, c) if !chars.is_empty() => {
                let n = chars.len();
                chars[i % n] = c;
            }
            Mutation::Delete(i) if !chars.is_empty() => {
                let n = chars.len();
                chars.remove(i % n);
            }
            Mutation::Repeat(n) => return s.repeat(n),
            // Nothing to replace or delete in an empty string.
            Mutation::Replace(..) | Mutation::Delete(_) => {}
        }
        chars.into_iter().collect()
    }

    proptest! {
        /// Ids from the grammar, then mutated: `parse` accepts exactly what
        /// the grammar accepts, both ways (about half the inputs are valid),
        /// and an accepted id is safe as a path component.
        #[test]
        fn parse_accepts_exactly_the_grammar(
            id in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
            mutations in prop::collection::vec(arb_mutation(), 0..3),
        ) {
            let s = mutations.iter().fold(id, |s, m| apply(&s, m));
            let parsed = VmId::parse(&s);
            prop_assert_eq!(parsed.is_ok(), grammar_accepts(&s), "{:?} -> {:?}", s, parsed);
            match parsed {
                Ok(id) => {
                    prop_assert_eq!(id.as_str(), s.as_str());
                    prop_assert!(!id.as_str().contains('/'));
                    prop_assert!(id.as_str() != "." && id.as_str() != "..");
                }
                Err(VmIdError::Empty) => prop_assert!(s.is_empty()),
                Err(VmIdError::TooLong(n)) => {
                    prop_assert_eq!(n, s.len());
                    prop_assert!(n > MAX_VM_ID_LEN);
                }
                Err(VmIdError::BadCharacter) => prop_assert!(!s.is_empty() && s.len() <= MAX_VM_ID_LEN),
            }
        }
    }

    #[test]
    fn the_mutated_grammar_yields_both_valid_and_invalid_ids() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        let strategy = (
            "[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
            prop::collection::vec(arb_mutation(), 0..3),
        );
        let mut runner = TestRunner::deterministic();
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..1000 {
            let (id, muts) = strategy.new_tree(&mut runner).expect("tree").current();
            let s = muts.iter().fold(id, |s, m| apply(&s, m));
            if VmId::parse(&s).is_ok() {
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        // The property above bites both ways only if both kinds are common.
        assert!(
            valid > 200 && invalid > 200,
            "{valid} valid, {invalid} invalid"
        );
    }
}
