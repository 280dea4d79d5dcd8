//! Reading the declared variables out of an environment: the values found,
//! the declared defaults where none is set, each parsed by its declaration,
//! and a bad value turned into one [`EnvError`] line naming the variable.

use super::variables::{DefaultValue, PREFIX, Setting, VARIABLES, Var};

/// A configuration error: one line naming the variable and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?} is invalid: {expected}")]
pub struct EnvError {
    /// The full variable name.
    pub variable: String,
    /// The value found.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

/// The error for `var` holding `value`, which is not `expected`.
pub fn bad(var: Var, value: &str, expected: impl Into<String>) -> EnvError {
    EnvError {
        variable: var.declaration().full_name(),
        value: value.to_owned(),
        expected: expected.into(),
    }
}

/// The declared variables' values as found in the environment.
pub struct Env {
    set: Vec<Option<String>>,
}

impl Env {
    /// Keeps the declared `UNKEY_VMCP_*` variables of `vars`.
    pub fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut set = vec![None; VARIABLES.len()];
        for (key, value) in vars {
            let Some(name) = key.strip_prefix(PREFIX) else {
                continue;
            };
            if let Some(v) = VARIABLES.iter().find(|v| v.name == name) {
                set[v.var as usize] = Some(value);
            }
        }
        Self { set }
    }

    /// The value the environment holds, if any.
    pub fn set(&self, var: Var) -> Option<&str> {
        self.set[var as usize].as_deref()
    }

    /// The value set, else the declared default text (none for unset or computed defaults).
    pub fn get(&self, var: Var) -> Option<&str> {
        match (self.set(var), var.declaration().default) {
            (Some(v), _) => Some(v),
            (None, DefaultValue::Text(t)) => Some(t),
            (None, DefaultValue::Unset | DefaultValue::Computed(_)) => None,
        }
    }

    /// Parses the value (set or default) when there is one.
    pub fn optional<S: Setting>(&self, _: S) -> Result<Option<S::Value>, EnvError> {
        self.get(S::VAR)
            .map(|v| S::parse(v).map_err(|expected| bad(S::VAR, v, expected)))
            .transpose()
    }

    /// Parses the value of a variable declared with a default text.
    pub fn value<S: Setting>(&self, setting: S) -> Result<S::Value, EnvError> {
        self.optional(setting)?.ok_or_else(|| {
            bad(
                S::VAR,
                "",
                "a value (VMCP declares no default for this variable)",
            )
        })
    }
}
