//! The released-contract baseline (`buf/released.binpb`, what `make lint`'s
//! `buf breaking` compares against) covers every RPC in `proto/`: an RPC
//! missing from it would not be guarded against breaking changes. Refresh
//! it with `make contracts-baseline` when releasing.

use std::collections::BTreeSet;

use prost::Message;
use prost_types::FileDescriptorSet;

/// `package.Service/Method` of every RPC in a descriptor set, skipping
/// files not from `proto/` (well-known and Google types).
fn rpcs(set: &FileDescriptorSet) -> BTreeSet<String> {
    set.file
        .iter()
        .filter(|f| {
            let package = f.package();
            !package.starts_with("google.") && !package.starts_with("grpc.")
        })
        .flat_map(|f| {
            f.service.iter().flat_map(move |s| {
                s.method
                    .iter()
                    .map(move |m| format!("{}.{}/{}", f.package(), s.name(), m.name()))
            })
        })
        .collect()
}

#[test]
fn the_released_baseline_covers_every_rpc_in_proto() {
    let baseline = std::fs::read("buf/released.binpb").expect("buf/released.binpb");
    let baseline = FileDescriptorSet::decode(baseline.as_slice()).expect("a descriptor set");
    let current =
        FileDescriptorSet::decode(bfb::pb::FILE_DESCRIPTOR_SET).expect("bfb's descriptors");
    let (released, served) = (rpcs(&baseline), rpcs(&current));
    assert!(
        served.contains("bfb.customer.v1.CustomerAggregateService/GetCustomer"),
        "{served:?}"
    );
    let missing: Vec<_> = served.difference(&released).collect();
    assert!(
        missing.is_empty(),
        "RPCs in proto/ that buf breaking does not guard (run `make contracts-baseline`): {missing:?}"
    );
}
