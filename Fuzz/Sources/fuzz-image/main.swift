import FuzzSupport

// The image harness (Fuzz/README.md): see ImageHarness. Its seeds come from Fuzz/make-seeds.py.
// SwiftPM links `main` to this symbol (see Harness.main); the package is built with
// -parse-as-library, so there is no top-level code.
@_cdecl("fuzz_image_main")
func entry(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    Harness.main(setup: { ImageHarness.prepare() }, run: ImageHarness.run)
}
