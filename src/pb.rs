//! Code generated from `proto/` by `build.rs`. Kept in one module so the rest of the crate
//! depends on the wire types in exactly one place.
#![allow(missing_docs)]

/// `orders.*` packages.
pub mod orders {
    /// Version 1 of the public gRPC API.
    pub mod v1 {
        tonic::include_proto!("orders.v1");
    }
    /// Event schemas published to Kafka.
    pub mod events {
        /// Version 1 of the event schemas, with proto3-JSON serde support.
        pub mod v1 {
            tonic::include_proto!("orders.events.v1");
            include!(concat!(env!("OUT_DIR"), "/orders.events.v1.serde.rs"));
        }
    }
}

/// `payments.*`: events consumed from the payments service.
pub mod payments {
    /// Payment events.
    pub mod events {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("payments.events.v1");
            include!(concat!(env!("OUT_DIR"), "/payments.events.v1.serde.rs"));
        }
    }
}

/// `customers.*`: events consumed from the customers service.
pub mod customers {
    /// Customer events.
    pub mod events {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("customers.events.v1");
            include!(concat!(env!("OUT_DIR"), "/customers.events.v1.serde.rs"));
        }
    }
}

/// Encoded descriptors of the gRPC API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("orders_descriptor");
