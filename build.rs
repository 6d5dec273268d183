//! Compiles `proto/` into Rust with a vendored `protoc`, so no system protobuf compiler is
//! needed:
//! - `orders.v1` (the gRPC API) with tonic, plus the descriptor set gRPC reflection serves;
//! - the event schemas (`orders.events.v1`, which this service publishes, and
//!   `payments.events.v1` / `customers.events.v1`, which it consumes) with prost and pbjson,
//!   which generates serde code following the proto3 JSON mapping events travel in.

use std::{env, error::Error, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = format!("--proto_path={}", protoc_bin_vendored::include_path()?.display());
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut api = tonic_prost_build::Config::new();
    api.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("orders_descriptor.bin"))
        .protoc_arg(&include)
        .compile_with_config(api, &["proto/orders/v1/orders.proto"], &["proto"])?;

    let events_descriptor = out_dir.join("events_descriptor.bin");
    tonic_prost_build::Config::new()
        .protoc_executable(&protoc)
        .protoc_arg(&include)
        .file_descriptor_set_path(&events_descriptor)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(
            &[
                "proto/orders/events/v1/events.proto",
                "proto/payments/events/v1/events.proto",
                "proto/customers/events/v1/events.proto",
            ],
            &["proto"],
        )?;
    // Tolerant readers: a producer may add fields (buf breaking allows it), so unknown
    // fields are skipped instead of turning every newer event into a poison message.
    pbjson_build::Builder::new()
        .register_descriptors(&fs::read(&events_descriptor)?)?
        .ignore_unknown_fields()
        .build(&[".orders.events.v1", ".payments.events.v1", ".customers.events.v1"])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
