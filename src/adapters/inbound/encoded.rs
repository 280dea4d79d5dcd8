//! The read answers, encoded once per published details.
//!
//! An owner publishes its VM as immutable [`VmDetails`] and replaces them on
//! every change, so the wire bytes of a GetVmInfo answer, and of the VM's
//! entry in a ListVms page, are a function of those details alone. They are
//! made on the first read, kept in the details' [`EncodingMemo`], and every
//! later read of the same details copies a reference to them: no conversion
//! to the wire message, no encoding. Converting and encoding was about a tenth
//! of a GetVmInfo's CPU (BENCHMARKS.md, 2026-12-02).
//!
//! [`EncodingMemo`]: crate::ports::EncodingMemo

use std::sync::{Arc, OnceLock};

use buffa::Message;
use bytes::{Bytes, BytesMut};
use connectrpc::{CodecFormat, ConnectError, Encodable};

use crate::ports::{VmDetails, VmPage};
use crate::proto::vmm::v1 as pb;

use super::convert::{details_out, vm_info_out};

/// What is kept per published details: each encoding once asked for.
#[derive(Debug, Default)]
struct Encodings {
    /// The GetVmInfo answer in Connect binary / gRPC framing's payload.
    info_proto: OnceLock<Bytes>,
    /// The GetVmInfo answer in Connect JSON.
    info_json: OnceLock<Bytes>,
    /// The VM's `VmInfo` entry of a ListVms page, in protobuf.
    entry_proto: OnceLock<Bytes>,
}

/// `slot`'s bytes, made by `make` when empty. A failed encoding is not kept.
fn kept(
    slot: &OnceLock<Bytes>,
    make: impl FnOnce() -> Result<Bytes, ConnectError>,
) -> Result<Bytes, ConnectError> {
    if let Some(bytes) = slot.get() {
        return Ok(bytes.clone());
    }
    let bytes = make()?;
    Ok(slot.get_or_init(|| bytes).clone())
}

fn encodings(details: &VmDetails) -> Option<&Encodings> {
    details.encoded.get_or_init(Encodings::default)
}

/// A GetVmInfo answer: the VM's published details, encoded on first use.
#[derive(Debug, Clone)]
pub struct InfoAnswer(pub Arc<VmDetails>);

impl Encodable<pb::GetVmInfoResponse> for InfoAnswer {
    fn encode(&self, codec: CodecFormat) -> Result<Bytes, ConnectError> {
        let fresh = || Encodable::<pb::GetVmInfoResponse>::encode(&details_out(&self.0), codec);
        let Some(memo) = encodings(&self.0) else {
            return fresh();
        };
        match codec {
            CodecFormat::Proto => kept(&memo.info_proto, fresh),
            CodecFormat::Json => kept(&memo.info_json, fresh),
            _ => fresh(),
        }
    }
}

/// A ListVms answer. In protobuf it is the page's entries, each kept with
/// its VM's details, followed by the page's own fields: the bytes a full
/// `ListVmsResponse` encodes to (field 1 first, then 2, 3 and 4). In JSON it
/// is the message, converted and encoded.
#[derive(Debug, Clone)]
pub struct ListAnswer(pub VmPage);

impl ListAnswer {
    /// The page as a wire message.
    pub fn message(&self) -> pb::ListVmsResponse {
        let page = &self.0;
        pb::ListVmsResponse {
            vms: page.vms.iter().map(|v| vm_info_out(&v.snapshot)).collect(),
            ..self.tail()
        }
    }

    /// The page's own fields, without its entries.
    fn tail(&self) -> pb::ListVmsResponse {
        let page = &self.0;
        pb::ListVmsResponse {
            vms: Vec::new(),
            next_page_token: page.next_page_token.clone(),
            total_count: i32::try_from(page.total_count).unwrap_or(i32::MAX),
            revision: page.revision,
            ..Default::default()
        }
    }
}

/// The tag of `ListVmsResponse.vms` (field 1, length-delimited).
const VMS_TAG: u64 = (1 << 3) | 2;

impl Encodable<pb::ListVmsResponse> for ListAnswer {
    fn encode(&self, codec: CodecFormat) -> Result<Bytes, ConnectError> {
        if codec != CodecFormat::Proto {
            return Encodable::<pb::ListVmsResponse>::encode(&self.message(), codec);
        }
        let entries = self
            .0
            .vms
            .iter()
            .map(|v| {
                let fresh = || Ok(vm_info_out(&v.snapshot).encode_to_bytes());
                match encodings(v) {
                    Some(memo) => kept(&memo.entry_proto, fresh),
                    None => fresh(),
                }
            })
            .collect::<Result<Vec<_>, ConnectError>>()?;
        let tail = self.tail().encode_to_bytes();
        let size = entries.iter().map(|e| e.len() + 11).sum::<usize>() + tail.len();
        let mut out = BytesMut::with_capacity(size);
        for entry in &entries {
            buffa::encoding::encode_varint(VMS_TAG, &mut out);
            buffa::encoding::encode_varint(entry.len() as u64, &mut out);
            out.extend_from_slice(entry);
        }
        out.extend_from_slice(&tail);
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::config::tests::valid;
    use crate::domain::{Vm, VmId, VmState};

    fn details(id: &str, labels: usize) -> Arc<VmDetails> {
        let mut config = valid();
        config.metadata = (0..labels)
            .map(|i| (format!("k{i}"), format!("v{i}")))
            .collect::<BTreeMap<_, _>>();
        let vm = Vm::new(
            VmId::parse(id).expect("id"),
            config,
            VmState::Running,
            1_000,
        );
        let mut d = VmDetails::of(vm.snapshot().clone());
        d.backend_info.insert("vmm_pid".into(), "42".into());
        Arc::new(d)
    }

    #[test]
    fn an_info_answer_is_the_message_encoded_and_is_kept() {
        let d = details("a", 2);
        let answer = InfoAnswer(Arc::clone(&d));
        let want = details_out(&d);
        for codec in [CodecFormat::Proto, CodecFormat::Json] {
            let first = answer.encode(codec).expect("encodes");
            let again = InfoAnswer(Arc::clone(&d)).encode(codec).expect("encodes");
            let decoded: pb::GetVmInfoResponse = match codec {
                CodecFormat::Proto => Message::decode_from_slice(&first).expect("decodes"),
                _ => serde_json::from_slice(&first).expect("decodes"),
            };
            // Equal as messages: map entries come in any order.
            assert_eq!(decoded, want, "{codec:?}");
            assert_eq!(
                first.as_ptr(),
                again.as_ptr(),
                "{codec:?}: the second read reuses the first one's bytes"
            );
        }
    }

    #[test]
    fn changed_details_are_encoded_anew() {
        let d = details("a", 0);
        let before = InfoAnswer(Arc::clone(&d))
            .encode(CodecFormat::Proto)
            .expect("encodes");
        // How owners publish a change: a clone, changed, in a new Arc.
        let mut changed = (*d).clone();
        changed.sampled_at_ms = Some(7);
        let after = InfoAnswer(Arc::new(changed))
            .encode(CodecFormat::Proto)
            .expect("encodes");
        assert_ne!(before, after);
        let decoded = pb::GetVmInfoResponse::decode_from_slice(&after).expect("decodes");
        assert_eq!(decoded.metrics_sampled_timestamp_ms, 7);
    }

    proptest! {
        /// Whatever the page, the assembled bytes decode to the full
        /// message, on the first read and on the next.
        #[test]
        fn a_list_answer_is_the_message_encoded(
            labels in proptest::collection::vec(0usize..4, 0..6),
            token in "[a-z0-9]{0,12}",
            total in any::<u32>(),
            revision in any::<u64>(),
        ) {
            let vms = labels
                .iter()
                .enumerate()
                .map(|(i, n)| details(&format!("vm-{i}"), *n))
                .collect();
            let answer = ListAnswer(VmPage {
                revision,
                vms,
                next_page_token: token,
                total_count: total,
            });
            let want = answer.message();
            let first = answer.encode(CodecFormat::Proto).expect("encodes");
            let again = answer.encode(CodecFormat::Proto).expect("encodes");
            prop_assert_eq!(&first, &again, "the entries are kept, in page order");
            prop_assert_eq!(first.len(), want.encoded_len() as usize);
            let decoded = pb::ListVmsResponse::decode_from_slice(&first).expect("decodes");
            prop_assert_eq!(&decoded, &want);
            let json = answer.encode(CodecFormat::Json).expect("encodes");
            let decoded: pb::ListVmsResponse = serde_json::from_slice(&json).expect("decodes");
            prop_assert_eq!(decoded, want);
        }
    }
}
