import FuzzSupport

// The superblock harness (Fuzz/README.md): see MetadataInput.superblock.
// SwiftPM links `main` to this symbol (see Harness.main); the package is built with
// -parse-as-library, so there is no top-level code.
@_cdecl("fuzz_superblock_main")
func entry(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> CInt {
    Harness.main(seeds: { MetadataInput.seeds("superblock") }, setup: { _ = ReferencePool.shared }) { data in
        MetadataExercise.run(MetadataInput.superblock(data))
    }
}
