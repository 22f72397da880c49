//! flowserve: the HTTP service that serves flowtrain's model packages.
//!
//! The service itself lands with the server issue; until then the binary reports its version.

fn main() {
    println!(
        "flowserve {} (model package format {})",
        env!("CARGO_PKG_VERSION"),
        flowpack::FORMAT_VERSION
    );
}
