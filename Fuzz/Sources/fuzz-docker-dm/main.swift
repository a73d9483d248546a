import FuzzSupport

// The docker-dm harness (Fuzz/README.md): see DockerDMHarness. Its seeds come from Fuzz/make-seeds.py.
// SwiftPM links `main` to this symbol (see Harness.main); the package is built with
// -parse-as-library, so there is no top-level code.
@_cdecl("fuzz_docker_dm_main")
func entry(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    Harness.main(setup: { DockerDMHarness.prepare() }, run: DockerDMHarness.run)
}
