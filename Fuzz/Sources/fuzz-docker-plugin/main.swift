import FuzzSupport

// The Docker graphdriver plugin harness (Fuzz/README.md): see DockerPluginHarness. Its seeds come
// from Fuzz/make-seeds.py.
// SwiftPM links `main` to this symbol (see Harness.main); the package is built with
// -parse-as-library, so there is no top-level code.
@_cdecl("fuzz_docker_plugin_main")
func entry(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    Harness.main(setup: { DockerPluginHarness.prepare() }, run: DockerPluginHarness.run)
}
