import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// A container image on disk, opened for import: an OCI image layout
/// directory (`oci-layout`, `index.json` → manifest → config) or a
/// `docker save` archive (a tar, possibly compressed, with `manifest.json`).
///
/// Opening reads the manifests and the config, and checks that the config's
/// `rootfs.diff_ids` match the layers in number. `verify(_:)` checks a
/// layer's blob digest (when the format names one) and its DiffID: the
/// sha256 of the uncompressed tar, against the config. Layer ids for the
/// store are the chain ids (OCI image spec, config.md "Layer ChainID"), so
/// importing the same layers twice shares them.
///
/// A docker archive is read twice with `ArchiveReader`: `manifest.json` comes
/// last in `docker save` output, so the first read finds it (and where every
/// file is), and the second extracts only the config and the layer tars the
/// chosen image names to a private scratch directory (`ScratchDirectory`),
/// removed when the source is deinitialized (`ImageSource+DockerArchive.swift`).
///
/// Every file of an image is refused unless it is a regular file inside the
/// image: a FIFO would block its reader forever, a device would be read as a
/// blob, and a symlink out of the layout would read whatever it names.
public final class ImageSource {
    public enum Format: String, Sendable {
        case ociLayout = "oci-layout"
        case dockerArchive = "docker-archive"
    }

    public struct Layer: Equatable, Sendable {
        /// 0 is the bottom layer.
        public var index: Int
        /// The layer's file on disk (compressed or not).
        public var path: String
        public var mediaType: String
        /// The blob digest from the manifest, when the format has one.
        public var blobDigest: String?
        /// From the config's rootfs.diff_ids.
        public var diffID: String
        public var chainID: String
    }

    public enum Error: Swift.Error, CustomStringConvertible, Sendable {
        case notAnImage(path: String)
        case missingFile(path: String)
        case badJSON(file: String, reason: String)
        case badDigest(file: String, digest: String)
        case unsupportedMediaType(digest: String, mediaType: String)
        case noManifest(file: String, reason: String)
        case layerCountMismatch(config: String, diffIDs: Int, layers: Int)
        case blobDigestMismatch(file: String, expected: String, actual: String)
        case diffIDMismatch(layer: Int, file: String, expected: String, actual: String)
        case unsafeArchivePath(archive: String, entry: String)
        /// A file of the image is a FIFO, a device, a directory..., or resolves outside the image.
        case notARegularFile(path: String, found: String)
        /// The files the manifest names need more room than the scratch directory has.
        case noRoom(archive: String, directory: String, needed: UInt64, available: UInt64)
        /// The second read of the archive did not find what the first one did.
        case archiveChanged(archive: String, reason: String)

        public var description: String {
            switch self {
            case .notAnImage(let p): return "\(p) is neither an OCI image layout (no oci-layout file) nor a docker save archive (no manifest.json)"
            case .missingFile(let p): return "\(p) is missing"
            case .badJSON(let f, let r): return "\(f): \(r)"
            case .badDigest(let f, let d): return "\(f): '\(d)' is not a sha256 digest"
            case .unsupportedMediaType(let d, let m): return "layer \(d): unsupported media type \(m)"
            case .noManifest(let f, let r): return "\(f): \(r)"
            case .layerCountMismatch(let c, let d, let l): return "config \(c) lists \(d) diff ids for \(l) layers"
            case .blobDigestMismatch(let f, let e, let a): return "\(f): digest is \(a), the manifest says \(e)"
            case .diffIDMismatch(let i, let f, let e, let a): return "layer \(i) (\(f)): uncompressed digest is \(a), the config's diff id is \(e)"
            case .unsafeArchivePath(let a, let e): return "\(a): entry '\(e)' would land outside the extraction directory"
            case .notARegularFile(let p, let f): return "\(p) is \(f), not a regular file inside the image: refused"
            case .noRoom(let a, let d, let n, let f):
                return "\(a): the config and layers its manifest names need \(ByteSize.human(n)) in \(d), which has \(ByteSize.human(f)) free"
            case .archiveChanged(let a, let r): return "\(a) changed while it was read: \(r)"
            }
        }
    }

    /// Layer media types accepted; libarchive tells the compression from the bytes, whatever the type says.
    public static let layerMediaTypes: Set<String> = [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ]

    public let path: String
    public let format: Format
    public let layers: [Layer]
    /// The config blob's digest (OCI) or sha256 of the config file (docker), the image id.
    public let configDigest: String
    /// Where a docker archive's named files were unpacked; removed when the source goes.
    private let scratch: ScratchDirectory?
    let logger: Logger

    /// Opens the image at `path`. `reference` picks a manifest by its `org.opencontainers.image.ref.name`
    /// annotation (OCI) or a RepoTags entry (docker); nil takes the first. `temporaryDirectory` is where
    /// a docker archive's config and layers are unpacked (a store's ROOT/tmp).
    public init(path: String, reference: String? = nil, temporaryDirectory: String = NSTemporaryDirectory(),
                logger: Logger = Logger(label: "thinfs.image")) throws {
        self.path = path
        self.logger = logger
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else { throw Error.missingFile(path: path) }
        if isDirectory.boolValue {
            guard FileManager.default.fileExists(atPath: path + "/oci-layout") else {
                if FileManager.default.fileExists(atPath: path + "/manifest.json") {
                    // An unpacked docker save: same reading, no spill.
                    format = .dockerArchive
                    scratch = nil
                    let read = try Self.readDockerManifest(root: path, label: path, reference: reference)
                    layers = read.0
                    configDigest = read.1
                    return
                }
                throw Error.notAnImage(path: path)
            }
            format = .ociLayout
            scratch = nil
            let read = try Self.readOCILayout(path, reference: reference)
            layers = read.0
            configDigest = read.1
        } else {
            format = .dockerArchive
            // Removed again by its deinit if the archive is refused.
            let dir = try ScratchDirectory(in: temporaryDirectory)
            let read = try Self.unpackDockerArchive(path, into: dir.path, reference: reference)
            layers = read.0
            configDigest = read.1
            scratch = dir
        }
        logger.info("image opened", metadata: ["image.path": "\(path)", "image.format": "\(format.rawValue)",
                                               "image.layers": "\(layers.count)", "image.config": "\(configDigest)"])
    }

    /// The chain id of the top layer: the id of the image's top layer in the store.
    public var topChainID: String? { layers.last?.chainID }

    /// Checks the blob digest (when known) and the DiffID of `layer`; returns the uncompressed size.
    @discardableResult
    public func verify(_ layer: Layer) throws -> UInt64 {
        if let expected = layer.blobDigest {
            let actual = try ImageDigest.sha256(file: layer.path)
            guard actual == expected else { throw Error.blobDigestMismatch(file: layer.path, expected: expected, actual: actual) }
        }
        let (actual, size) = try ImageDigest.sha256(decompressing: layer.path)
        guard actual == layer.diffID else {
            throw Error.diffIDMismatch(layer: layer.index, file: layer.path, expected: layer.diffID, actual: actual)
        }
        return size
    }

    /// A reader over the layer's tar entries (decompressing as needed).
    public func open(_ layer: Layer) throws -> ArchiveReader {
        try ArchiveReader(path: layer.path)
    }

    // MARK: JSON

    struct Descriptor: Decodable {
        var mediaType: String?
        var digest: String
        var size: Int64?
        var annotations: [String: String]?
        var platform: Platform?
        struct Platform: Decodable {
            var architecture: String?
            var os: String?
        }
    }

    struct Index: Decodable {
        var mediaType: String?
        var manifests: [Descriptor]
    }

    struct Manifest: Decodable {
        var mediaType: String?
        var config: Descriptor
        var layers: [Descriptor]
    }

    struct Config: Decodable {
        struct RootFS: Decodable {
            var type: String
            var diff_ids: [String]
        }
        var rootfs: RootFS
    }

    struct DockerManifestEntry: Decodable {
        var Config: String
        var RepoTags: [String]?
        var Layers: [String]
    }

    static func decode<T: Decodable>(_ type: T.Type, file: String) throws -> T {
        guard let data = FileManager.default.contents(atPath: file) else { throw Error.missingFile(path: file) }
        return try decode(type, data: data, file: file)
    }

    static func decode<T: Decodable>(_ type: T.Type, data: Data, file: String) throws -> T {
        do {
            return try JSONDecoder().decode(type, from: data)
        } catch {
            throw Error.badJSON(file: file, reason: "\(error)")
        }
    }

    static func blobPath(_ root: String, _ digest: String, referencedFrom file: String) throws -> String {
        guard ImageDigest.isValid(digest) else { throw Error.badDigest(file: file, digest: digest) }
        return try regularFile(root + "/blobs/sha256/" + digest.dropFirst(7), inside: root)
    }

    /// `path`, if it is a regular file inside `root` once symlinks are resolved. Checked before
    /// anything opens it: opening a FIFO blocks until a writer comes, a device reads as endless or
    /// empty bytes, and a symlink out of the image reads whatever it names.
    static func regularFile(_ path: String, inside root: String) throws -> String {
        var st = stat()
        guard lstat(path, &st) == 0, let real = realPath(path), let realRoot = realPath(root) else {
            throw Error.missingFile(path: path)
        }
        guard realRoot == "/" || real.hasPrefix(realRoot + "/") else {
            throw Error.notARegularFile(path: path, found: "outside the image (it resolves to \(real))")
        }
        guard stat(real, &st) == 0 else { throw Error.missingFile(path: path) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw Error.notARegularFile(path: path, found: fileKind(st.st_mode)) }
        return path
    }

    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    static func fileKind(_ mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFIFO: "a FIFO"
        case S_IFCHR: "a character device"
        case S_IFBLK: "a block device"
        case S_IFSOCK: "a socket"
        case S_IFDIR: "a directory"
        default: "of file type \(String(mode & S_IFMT, radix: 8))"
        }
    }

    static func diffIDs(_ config: Config, file: String) throws -> [String] {
        guard config.rootfs.type == "layers" else { throw Error.badJSON(file: file, reason: "rootfs.type is '\(config.rootfs.type)', not 'layers'") }
        for d in config.rootfs.diff_ids where !ImageDigest.isValid(d) { throw Error.badDigest(file: file, digest: d) }
        return config.rootfs.diff_ids
    }

    // MARK: OCI image layout

    static let indexTypes: Set<String> = ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"]

    static func readOCILayout(_ root: String, reference: String?) throws -> ([Layer], String) {
        let layoutFile = try regularFile(root + "/oci-layout", inside: root)
        struct Layout: Decodable { var imageLayoutVersion: String }
        let layout = try decode(Layout.self, file: layoutFile)
        guard layout.imageLayoutVersion.hasPrefix("1.") else {
            throw Error.badJSON(file: layoutFile, reason: "imageLayoutVersion \(layout.imageLayoutVersion) is not 1.x")
        }
        var indexFile = try regularFile(root + "/index.json", inside: root)
        var index = try decode(Index.self, file: indexFile)
        var candidates = index.manifests
        if let reference {
            candidates = candidates.filter { $0.annotations?["org.opencontainers.image.ref.name"] == reference }
            guard !candidates.isEmpty else { throw Error.noManifest(file: indexFile, reason: "no manifest is named '\(reference)'") }
        }
        // A nested index (multi-platform image): follow it to this machine's platform, else the first.
        while let first = candidates.first, indexTypes.contains(first.mediaType ?? "") {
            indexFile = try blobPath(root, first.digest, referencedFrom: indexFile)
            index = try decode(Index.self, file: indexFile)
            candidates = index.manifests.filter { $0.platform == nil || ($0.platform?.os == "linux" && $0.platform?.architecture == "amd64") }
            if candidates.isEmpty { candidates = index.manifests }
        }
        guard let chosen = candidates.first else { throw Error.noManifest(file: indexFile, reason: "lists no manifests") }
        let manifestFile = try blobPath(root, chosen.digest, referencedFrom: indexFile)
        let manifest = try decode(Manifest.self, file: manifestFile)
        let configFile = try blobPath(root, manifest.config.digest, referencedFrom: manifestFile)
        let ids = try diffIDs(decode(Config.self, file: configFile), file: configFile)
        guard ids.count == manifest.layers.count else {
            throw Error.layerCountMismatch(config: configFile, diffIDs: ids.count, layers: manifest.layers.count)
        }
        let chain = ImageDigest.chainIDs(ids)
        var layers: [Layer] = []
        for (i, d) in manifest.layers.enumerated() {
            let type = d.mediaType ?? "application/vnd.oci.image.layer.v1.tar"
            guard layerMediaTypes.contains(type) else { throw Error.unsupportedMediaType(digest: d.digest, mediaType: type) }
            let file = try blobPath(root, d.digest, referencedFrom: manifestFile)
            layers.append(Layer(index: i, path: file, mediaType: type, blobDigest: d.digest, diffID: ids[i], chainID: chain[i]))
        }
        return (layers, manifest.config.digest)
    }

    // MARK: docker save

    /// An unpacked `docker save` directory: its files are read where they are.
    static func readDockerManifest(root: String, label: String, reference: String?) throws -> ([Layer], String) {
        let manifestFile = try regularFile(root + "/manifest.json", inside: root)
        let chosen = try chooseDockerImage(decode([DockerManifestEntry].self, file: manifestFile), reference: reference, label: label)
        return try dockerLayers(chosen, label: label) { name in
            guard !name.split(separator: "/").contains("..") else { throw Error.unsafeArchivePath(archive: label, entry: name) }
            return try regularFile(root + "/" + name, inside: root)
        }
    }

    /// The manifest entry tagged `reference`, or the first.
    static func chooseDockerImage(_ entries: [DockerManifestEntry], reference: String?, label: String) throws -> DockerManifestEntry {
        let chosen: DockerManifestEntry?
        if let reference {
            chosen = entries.first { $0.RepoTags?.contains(reference) ?? false }
        } else {
            chosen = entries.first
        }
        guard let chosen else {
            throw Error.noManifest(file: "\(label): manifest.json", reason: reference.map { "no image is tagged '\($0)'" } ?? "lists no images")
        }
        return chosen
    }

    /// The layers of `chosen`, whose files `file` finds on disk by the names the manifest gives.
    static func dockerLayers(_ chosen: DockerManifestEntry, label: String,
                             file: (String) throws -> String) throws -> ([Layer], String) {
        let configFile = try file(chosen.Config)
        let ids = try diffIDs(decode(Config.self, file: configFile), file: "\(label): \(chosen.Config)")
        guard ids.count == chosen.Layers.count else {
            throw Error.layerCountMismatch(config: "\(label): \(chosen.Config)", diffIDs: ids.count, layers: chosen.Layers.count)
        }
        let chain = ImageDigest.chainIDs(ids)
        var layers: [Layer] = []
        for (i, name) in chosen.Layers.enumerated() {
            let path = try file(name)
            // Docker 25 and later store layers as OCI blobs: their name is their digest.
            var blob: String?
            if name.hasPrefix("blobs/sha256/") {
                let d = "sha256:" + name.dropFirst("blobs/sha256/".count)
                if ImageDigest.isValid(d) { blob = d }
            }
            layers.append(Layer(index: i, path: path, mediaType: "application/vnd.docker.image.rootfs.diff.tar", blobDigest: blob,
                                diffID: ids[i], chainID: chain[i]))
        }
        return (layers, try ImageDigest.sha256(file: configFile))
    }
}
