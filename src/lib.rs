//! octserve: an image-classification inference service for Octave-Convolution ResNets and their
//! vanilla twins. See README.md.

pub mod alloc;
pub mod batcher;
pub mod budget;
pub mod config;
pub mod connections;
pub mod dataset;
pub mod deadline;
pub mod device;
pub mod device_peak;
pub mod error;
pub mod evaluate;
pub mod kserve;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod registry;
pub mod repository;
pub mod rest;
pub mod router;
pub mod security;
pub mod server;
pub mod service;
pub mod stats;
pub mod variant;
pub mod worker;

/// Code generated from `proto/` (see build.rs).
pub mod pb {
    tonic::include_proto!("octserve.v1");

    /// The Open Inference Protocol (KServe v2), package `inference`.
    pub mod inference {
        tonic::include_proto!("inference");
    }

    /// Descriptors of every served proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}
