//! Code generated from `proto/` by `build.rs`, and the descriptor set served
//! by reflection.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The protobuf codec of every generated client and server: tonic's prost
/// codec with a 512-byte encode buffer instead of 8 KiB. The buffer lives
/// as long as the request body, which for a downstream call is until the
/// answer arrives: with the default, each call in flight held 8 KiB per
/// downstream request of a few dozen bytes (heaptrack: the largest item of
/// bfb's memory per in-flight call). Larger messages grow the buffer.
/// Decoding keeps tonic's default.
pub struct LeanCodec<T, U>(std::marker::PhantomData<(T, U)>);

/// The encode buffer [`LeanCodec`] starts with.
pub const ENCODE_BUFFER: usize = 512;

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        // tonic's default yield threshold (32 KiB) with the small buffer.
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(ENCODE_BUFFER, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::default())
    }
}

/// Every file of `proto/` and its imports, with source comments, encoded.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bfb_descriptor.bin"));

/// Every method bfb serves, `package.Service/Method`, read from the
/// contracts: bfb's own services (not the simulator's), health and
/// reflection.
pub fn known_methods() -> Vec<String> {
    let mut methods = vec![
        "grpc.health.v1.Health/Check".to_string(),
        "grpc.health.v1.Health/Watch".to_string(),
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_string(),
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".to_string(),
    ];
    let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(FILE_DESCRIPTOR_SET)
    else {
        return methods;
    };
    for file in set.file {
        let package = file.package();
        if !package.starts_with("bfb.") || package.starts_with("bfb.sim.") {
            continue;
        }
        for service in &file.service {
            for method in &service.method {
                methods.push(format!("{package}.{}/{}", service.name(), method.name()));
            }
        }
    }
    methods
}

/// bfb's own contracts.
pub mod bfb {
    /// Types shared by every aggregate.
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("bfb.common.v1");
        }
    }
    /// The customer aggregate.
    pub mod customer {
        pub mod v1 {
            tonic::include_proto!("bfb.customer.v1");
        }
        pub mod v2 {
            tonic::include_proto!("bfb.customer.v2");
        }
    }
    /// The user-activity aggregate.
    pub mod activity {
        pub mod v1 {
            tonic::include_proto!("bfb.activity.v1");
        }
    }
    /// Operator control of the cache.
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("bfb.admin.v1");
        }
    }
    /// Run-time control of the simulated downstream services.
    pub mod sim {
        pub mod v1 {
            tonic::include_proto!("bfb.sim.v1");
        }
    }
}

/// The contracts of the services bfb calls.
pub mod downstream {
    pub mod profile {
        pub mod v1 {
            tonic::include_proto!("downstream.profile.v1");
        }
    }
    pub mod favorites {
        pub mod v1 {
            tonic::include_proto!("downstream.favorites.v1");
        }
    }
    pub mod reviews {
        pub mod v1 {
            tonic::include_proto!("downstream.reviews.v1");
        }
    }
    pub mod orders {
        pub mod v1 {
            tonic::include_proto!("downstream.orders.v1");
        }
    }
    pub mod calls {
        pub mod v1 {
            tonic::include_proto!("downstream.calls.v1");
        }
    }
    pub mod emails {
        pub mod v1 {
            tonic::include_proto!("downstream.emails.v1");
        }
    }
    pub mod sms {
        pub mod v1 {
            tonic::include_proto!("downstream.sms.v1");
        }
    }
    pub mod directory {
        pub mod v1 {
            tonic::include_proto!("downstream.directory.v1");
        }
    }
}
