import FuzzSupport

// The containerd snapshots harness (Fuzz/README.md): see ContainerdHarness. It writes its own
// seeds (THINFS_FUZZ_WRITE_SEEDS), with the generated swift-protobuf messages.
// SwiftPM links `main` to this symbol (see Harness.main); the package is built with
// -parse-as-library, so there is no top-level code.
@_cdecl("fuzz_containerd_main")
func entry(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    Harness.main(seeds: ContainerdHarness.seeds, setup: { ContainerdHarness.prepare() }, run: ContainerdHarness.run)
}
