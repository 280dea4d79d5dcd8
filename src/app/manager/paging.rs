//! ListVms paging: opaque page tokens (the last id of a page) and cutting a
//! page out of the id-ordered views.

use std::sync::Arc;

use crate::domain::{VmConfigError, VmError, VmId};
use crate::ports::{ListQuery, VmPage};

use crate::ports::VmDetails;

/// Default ListVms page size.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest ListVms page size.
pub const MAX_PAGE_SIZE: u32 = 1000;
const PAGE_TOKEN_PREFIX: &str = "v1:";

/// The token that continues after `last`.
pub fn encode_token(last: &VmId) -> String {
    format!("{PAGE_TOKEN_PREFIX}{}", hex::encode(last.as_str()))
}

/// The id a token continues after; `invalid_argument` naming `page_token` otherwise.
pub fn decode_token(token: &str) -> Result<VmId, VmError> {
    let invalid = || {
        VmError::InvalidArgument(VmConfigError::new(
            "page_token",
            "is not a token returned by ListVms",
        ))
    };
    let hex = token.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(invalid)?;
    if hex.len() > 256 {
        return Err(invalid());
    }
    let bytes = hex::decode(hex).map_err(|_| invalid())?;
    let s = String::from_utf8(bytes).map_err(|_| invalid())?;
    VmId::parse(&s).map_err(|_| invalid())
}

/// The page size `query` asks for, within the limits.
pub fn page_size(query: &ListQuery) -> usize {
    let size = match query.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    size as usize
}

/// The id the page `query` asks for starts after (None: the first page).
pub fn start_after(query: &ListQuery) -> Result<Option<VmId>, VmError> {
    if query.page_token.is_empty() {
        Ok(None)
    } else {
        decode_token(&query.page_token).map(Some)
    }
}

/// The page made of `views` (ordered by id, already filtered), `more`
/// telling whether others follow, out of `total` matching VMs; every change
/// up to `revision` is in it.
pub fn page(views: &[Arc<VmDetails>], more: bool, total: u64, revision: u64) -> VmPage {
    let vms = views.to_vec();
    let next_page_token = match vms.last() {
        Some(last) if more => encode_token(&last.snapshot.id),
        _ => String::new(),
    };
    VmPage {
        revision,
        vms,
        next_page_token,
        total_count: u32::try_from(total).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::manager::registry::{Entry, Registry};
    use crate::app::owner::Request;
    use crate::domain::config::tests::valid;
    use crate::domain::{Vm, VmState};

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected() {
        let id = VmId::parse("vm-1.a_b").expect("valid");
        assert_eq!(decode_token(&encode_token(&id)), Ok(id));
        for bad in ["", "v1:", "v1:zz", "v1:2", "x:6162", "v1:2f2f", "v1:00"] {
            let err = decode_token(bad).expect_err(bad);
            assert!(
                matches!(err, VmError::InvalidArgument(ref e) if e.field == "page_token"),
                "{bad}: {err:?}"
            );
        }
    }

    /// A registry of `n` VMs `vm0`.. whose state alternates Running/Paused,
    /// with `vmx` still being created (generation 0, never listed); the
    /// listed counts are kept as the owners would.
    fn registry(n: usize) -> (Registry, Vec<tokio::sync::mpsc::Receiver<Request>>) {
        let reg = Registry::default();
        let mut queues = Vec::new();
        let mut add = |id: &str, generation: u64, state: VmState| {
            let id = VmId::parse(id).expect("valid");
            let mut snap = Vm::new(id.clone(), valid(), state, 1).snapshot().clone();
            snap.generation = generation;
            let view = Arc::new(VmDetails::of(snap));
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            queues.push(rx);
            // A receiver keeps the last value after its sender is gone.
            let (_, view_rx) = tokio::sync::watch::channel(view);
            if generation > 0 {
                reg.listed().moved(None, Some(state));
            }
            reg.insert(id, Entry { tx, view: view_rx });
        };
        for i in 0..n {
            let state = if i % 2 == 0 {
                VmState::Running
            } else {
                VmState::Paused
            };
            add(&format!("vm{i:02}"), 1, state);
        }
        add("vmx", 0, VmState::Created);
        (reg, queues)
    }

    fn walk(reg: &Registry, states: &[VmState], size: u32) -> Vec<String> {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let query = ListQuery {
                states: states.to_vec(),
                page_size: size,
                page_token: token,
            };
            let after = start_after(&query).expect("token");
            let (views, more) = reg.page(&query.states, after.as_ref(), page_size(&query));
            let p = page(&views, more, reg.listed().total(&query.states), 42);
            assert_eq!(p.revision, 42);
            assert!(p.vms.len() <= size as usize);
            seen.extend(p.vms.iter().map(|v| v.snapshot.id.to_string()));
            if p.next_page_token.is_empty() {
                assert!(!more);
                break;
            }
            token = p.next_page_token;
        }
        seen
    }

    #[test]
    fn pages_walk_every_listed_vm_once_in_order() {
        let (reg, _queues) = registry(7);
        let all: Vec<String> = (0..7).map(|i| format!("vm{i:02}")).collect();
        for size in [1, 3, 7, 8] {
            assert_eq!(walk(&reg, &[], size), all, "page size {size}");
        }
        let paused: Vec<String> = (0..7)
            .filter(|i| i % 2 == 1)
            .map(|i| format!("vm{i:02}"))
            .collect();
        assert_eq!(walk(&reg, &[VmState::Paused], 2), paused);
        assert_eq!(reg.listed().total(&[]), 7);
        assert_eq!(reg.listed().total(&[VmState::Paused]), 3);
        assert_eq!(reg.listed().total(&[VmState::Running, VmState::Paused]), 7);
    }

    #[test]
    fn a_full_last_page_has_no_token() {
        let (reg, _queues) = registry(6);
        let (views, more) = reg.page(&[], None, 6);
        let p = page(&views, more, reg.listed().total(&[]), 1);
        assert_eq!(p.vms.len(), 6);
        assert!(p.next_page_token.is_empty());
        assert_eq!(p.total_count, 6);
    }

    #[test]
    fn page_sizes_are_bounded() {
        let q = |page_size| ListQuery {
            states: vec![],
            page_size,
            page_token: String::new(),
        };
        assert_eq!(page_size(&q(0)), DEFAULT_PAGE_SIZE as usize);
        assert_eq!(page_size(&q(5)), 5);
        assert_eq!(page_size(&q(u32::MAX)), MAX_PAGE_SIZE as usize);
    }
}
