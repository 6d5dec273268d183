//! Code generated from `proto/` by `build.rs`. Kept in one module so the rest of the crate
//! depends on the wire types in exactly one place.
#![allow(missing_docs)]

/// `orders.v1`: the public gRPC API.
pub mod orders {
    /// Version 1 of the orders API.
    pub mod v1 {
        tonic::include_proto!("orders.v1");
    }
}

/// Encoded descriptors of every compiled proto file, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orders_descriptor");
