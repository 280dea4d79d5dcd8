//! ListVms paging: opaque page tokens (the last id of a page) and cutting a
//! page out of the id-ordered views.

use std::sync::Arc;

use crate::domain::{VmConfigError, VmError, VmId};
use crate::ports::{ListQuery, VmPage};

use crate::app::owner::VmView;

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

/// Cuts the page `query` asks for out of `matching` (ordered by id, already
/// filtered), which reflects every change up to `revision`.
pub fn page(matching: &[Arc<VmView>], query: &ListQuery, revision: u64) -> Result<VmPage, VmError> {
    let page_size = match query.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    let start = if query.page_token.is_empty() {
        0
    } else {
        let after = decode_token(&query.page_token)?;
        matching.partition_point(|v| v.snapshot.id <= after)
    };
    let vms: Vec<_> = matching
        .iter()
        .skip(start)
        .take(page_size as usize)
        .map(|v| v.snapshot.clone())
        .collect();
    let next_page_token = match vms.last() {
        Some(last) if start + vms.len() < matching.len() => encode_token(&last.id),
        _ => String::new(),
    };
    Ok(VmPage {
        revision,
        vms,
        next_page_token,
        total_count: u32::try_from(matching.len()).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn pages_walk_every_vm_once_in_order() {
        let views: Vec<Arc<VmView>> = (0..7)
            .map(|i| {
                let id = VmId::parse(&format!("vm{i}")).expect("valid");
                Arc::new(VmView::of(
                    Vm::new(id, valid(), VmState::Running, 1).snapshot().clone(),
                ))
            })
            .collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let p = page(
                &views,
                &ListQuery {
                    states: vec![],
                    page_size: 3,
                    page_token: token,
                },
                42,
            )
            .expect("page");
            assert_eq!(p.total_count, 7);
            assert_eq!(p.revision, 42);
            assert!(p.vms.len() <= 3);
            seen.extend(p.vms.iter().map(|s| s.id.to_string()));
            if p.next_page_token.is_empty() {
                break;
            }
            token = p.next_page_token;
        }
        let expected: Vec<String> = (0..7).map(|i| format!("vm{i}")).collect();
        assert_eq!(seen, expected);
    }
}
