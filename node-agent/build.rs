//! Generates the kubelet PodResources v1 client (the agent) and server (the tests and the e2e
//! harness serve the same proto) from `proto/api.proto`, and the same for the subset of the CRI
//! RuntimeService in `proto/cri.proto`. The proto is parsed by `protox`, a
//! protobuf compiler in Rust, so building needs no system `protoc`.

use std::io;

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed=proto/api.proto");
    println!("cargo:rerun-if-changed=proto/cri.proto");
    let fds = protox::compile(["proto/api.proto", "proto/cri.proto"], ["proto"])
        .map_err(io::Error::other)?;
    // compile_protos adds this attribute itself; compile_fds does not.
    tonic_prost_build::configure()
        .type_attribute(".", "#[allow(clippy::all)]")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
}
