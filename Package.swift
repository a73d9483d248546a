// swift-tools-version:6.1
//
// ThinFS: container layers in dm-thin snapshots, served through FUSE.
//
// Layering (each target only depends on the ones above it):
//
//   CCRC32C                 hardware CRC32C (SSE4.2) with a portable fallback
//   PersistentData          dm-thin's on-disk metadata: block manager, btrees,
//                           space maps, transaction manager, thin metadata
//   CFuse CDevMapper        system libraries: a modulemap and a shim.h each;
//   CExt2fs CArchive        exactly one Swift module imports each of them
//   CSQLite
//   CRBD                    librados and librbd, dlopened on first use (only RBD stores need them)
//   CRE2                    RE2 (C++) behind a C API, for containerd's filter patterns
//   ThinFSCore              what the volume, the FUSE server and the pool share: BlockDevice,
//                           ThinPoolError, the FileSystemVolume API and its value types, Lock,
//                           /proc readers (ProcFile, MountTable). No C library.
//   ThinFSExt4              ext4 through libext2fs over a BlockDevice (`Volume`): the only
//                           module importing CExt2fs
//   ThinFSFUSE              the FUSE server over any FileSystemVolume: the only module importing
//                           CFuse. Knows nothing of ext4, so it sits beside ThinFSExt4, not above.
//   ThinFS                  pool backends, thin devices, volume groups, layers, the daemon; it
//                           re-exports the three above, so its users import ThinFS alone.
//                           Cross-module internals are `package`, not `public`.
//   ThinFSContainerd        containerd's snapshots API (gRPC) over the layer store: its own
//                           target so gRPC and SwiftNIO stay out of ThinFS and its tests
//   ThinFSDocker            Docker's graphdriver plugin protocol (JSON over HTTP, SwiftNIO's
//                           HTTP/1 codec on a unix socket): its own target for the same reason
//   ThinFSCommands          swift-argument-parser commands, a library so tests drive it
//   thinfs, thinfs-mount    @main only
import PackageDescription

let package = Package(
    name: "ThinFS",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "thinfs", targets: ["thinfs"]),
        .executable(name: "thinfs-mount", targets: ["thinfs-mount"]),
        .library(name: "ThinFS", targets: ["ThinFS"]),
        .library(name: "PersistentData", targets: ["PersistentData"]),
        // For Fuzz/ (a package of its own): the containerd and Docker plugin harnesses.
        .library(name: "ThinFSContainerd", targets: ["ThinFSContainerd"]),
        .library(name: "ThinFSDocker", targets: ["ThinFSDocker"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        // SHA-256 for image digests and chain ids.
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        // containerd's snapshots API: gRPC over a unix socket, protobuf messages.
        .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        // Docker's graphdriver plugin protocol: HTTP/1 on a unix socket (already resolved through
        // grpc-swift-nio-transport; the version Package.resolved holds).
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
    ],
    targets: [
        // System libraries. Each is a modulemap plus a shim.h that only defines and includes.
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CDevMapper", pkgConfig: "devmapper", providers: [.apt(["libdevmapper-dev"])]),
        .systemLibrary(name: "CExt2fs", pkgConfig: "ext2fs", providers: [.apt(["libext2fs-dev"])]),
        .systemLibrary(name: "CArchive", pkgConfig: "libarchive", providers: [.apt(["libarchive-dev"])]),
        .systemLibrary(name: "CSQLite", pkgConfig: "sqlite3", providers: [.apt(["libsqlite3-dev"])]),

        // The one piece of C that Swift cannot express: the SSE4.2 crc32 instruction.
        .target(name: "CCRC32C"),
        // Wrappers for libc calls the Glibc module hides (fallocate needs _GNU_SOURCE).
        .target(name: "CThinFSShims"),
        // RE2 (C++) behind a C API: the regular expressions of containerd's filters, in Go's syntax
        // and with RE2's linear-time matching. Debian's libre2-dev.
        .target(name: "CRE2", linkerSettings: [.linkedLibrary("re2")]),
        // librados and librbd (Ceph RBD pools; Debian's librbd-dev, librados-dev), dlopened on first
        // use rather than linked: only thinfs.backend=rbd stores need them, and linked they were a
        // dozen of thinfs's shared libraries and much of every process's start-up (Sources/CRBD/include/CRBD.h).
        // watchers.cpp reaches librados's one C++ call ThinFS needs (an object's watchers) the same way.
        .target(name: "CRBD"),

        .target(
            name: "PersistentData",
            dependencies: ["CCRC32C"],
            // Every access to the btree, block-cache and space-map state goes through one
            // owner behind the pool's metadata lock, so dynamic exclusivity checks add
            // nothing but cost: callgrind put them at 27% of the pool's read and write paths.
            // Debug builds keep them.
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
        ),
        .target(
            name: "ThinFSCore",
            dependencies: [
                "PersistentData",
                "CThinFSShims",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "ThinFSExt4",
            dependencies: [
                "ThinFSCore",
                "CExt2fs",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            // libext2fs reports errors through com_err (error_message); its pkg-config file leaves it to the caller.
            linkerSettings: [.linkedLibrary("com_err")]
        ),
        .target(
            name: "ThinFSFUSE",
            dependencies: [
                "ThinFSCore",
                "CFuse",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "ThinFS",
            dependencies: [
                "PersistentData",
                "ThinFSCore",
                "ThinFSExt4",
                "ThinFSFUSE",
                "CThinFSShims",
                "CArchive",
                "CSQLite",
                "CDevMapper",
                "CRBD",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "ThinFSContainerd",
            dependencies: [
                "ThinFS", "CThinFSShims", "CRE2",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["Proto"]
        ),
        .target(
            name: "ThinFSDocker",
            dependencies: [
                "ThinFS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "ThinFSCommands",
            dependencies: [
                "ThinFS",
                "ThinFSContainerd",
                "ThinFSDocker",
                "PersistentData",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(name: "thinfs", dependencies: ["ThinFSCommands"]),
        .executableTarget(name: "thinfs-mount", dependencies: ["ThinFSCommands"]),

        // Shared by the test suites: thin-provisioning-tools as an oracle, scratch directories.
        .target(name: "TestSupport", dependencies: [.product(name: "Logging", package: "swift-log")], path: "Tests/TestSupport"),
        .testTarget(name: "PersistentDataTests", dependencies: ["PersistentData", "TestSupport"], exclude: ["Fixtures"]),
        .testTarget(
            name: "ThinFSTests",
            dependencies: ["ThinFS", "ThinFSCore", "ThinFSExt4", "ThinFSFUSE", "PersistentData", "ThinFSCommands", "TestSupport"]
        ),
        .testTarget(
            name: "ThinFSContainerdTests",
            dependencies: [
                "ThinFS", "ThinFSContainerd", "TestSupport",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]
        ),
        .testTarget(name: "ThinFSDockerTests", dependencies: ["ThinFS", "ThinFSDocker", "TestSupport"]),
        // Privileged: real FUSE mounts (needs /dev/fuse and root); each test is gated on both.
        .testTarget(name: "FUSETests", dependencies: ["ThinFS", "ThinFSCore", "ThinFSExt4", "ThinFSFUSE", "PersistentData", "TestSupport"], path: "Tests/FUSETests"),
    ],
    swiftLanguageModes: [.v6]
)

// Fuzz/ (scripts/fuzz.sh) sets THINFS_FUZZ_SANITIZE, e.g. "fuzzer,address", to instrument our own
// Swift modules only: -Xswiftc would also instrument gRPC, SwiftNIO, swift-protobuf and
// swift-crypto, whose coverage the harnesses do not aim at and whose sanitizer build was most of
// the fuzz step's time. Every regular target gets it, so new modules are covered without a change
// here. Without the variable (every other build) the package is as above.
if let sanitize = Context.environment["THINFS_FUZZ_SANITIZE"], !sanitize.isEmpty {
    for target in package.targets where target.type == .regular {
        target.swiftSettings = (target.swiftSettings ?? []) + [.unsafeFlags(["-sanitize=\(sanitize)"])]
    }
}
