import Foundation
import Logging

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
/// A docker archive is read once with `ArchiveReader` and its files are
/// spilled to a private temporary directory, removed when the source is
/// deinitialized: `manifest.json` comes last in `docker save` output, so the
/// layers cannot be streamed in order without it.
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
    /// Where a docker archive was spilled; removed in deinit.
    private let scratch: String?
    let logger: Logger

    /// Opens the image at `path`. `reference` picks a manifest by its `org.opencontainers.image.ref.name`
    /// annotation (OCI) or a RepoTags entry (docker); nil takes the first. `temporaryDirectory` is where
    /// a docker archive is spilled.
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
            let dir = temporaryDirectory + "/thinfs-image-" + UUID().uuidString
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            do {
                try Self.spill(archive: path, into: dir)
                let read = try Self.readDockerManifest(root: dir, label: path, reference: reference)
                layers = read.0
                configDigest = read.1
            } catch {
                try? FileManager.default.removeItem(atPath: dir)
                throw error
            }
            scratch = dir
        }
        logger.info("image opened", metadata: ["image.path": "\(path)", "image.format": "\(format.rawValue)",
                                               "image.layers": "\(layers.count)", "image.config": "\(configDigest)"])
    }

    deinit {
        if let scratch { try? FileManager.default.removeItem(atPath: scratch) }
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
        do {
            return try JSONDecoder().decode(type, from: data)
        } catch {
            throw Error.badJSON(file: file, reason: "\(error)")
        }
    }

    static func blobPath(_ root: String, _ digest: String, referencedFrom file: String) throws -> String {
        guard ImageDigest.isValid(digest) else { throw Error.badDigest(file: file, digest: digest) }
        let p = root + "/blobs/sha256/" + digest.dropFirst(7)
        guard FileManager.default.fileExists(atPath: p) else { throw Error.missingFile(path: p) }
        return p
    }

    static func diffIDs(_ config: Config, file: String) throws -> [String] {
        guard config.rootfs.type == "layers" else { throw Error.badJSON(file: file, reason: "rootfs.type is '\(config.rootfs.type)', not 'layers'") }
        for d in config.rootfs.diff_ids where !ImageDigest.isValid(d) { throw Error.badDigest(file: file, digest: d) }
        return config.rootfs.diff_ids
    }

    // MARK: OCI image layout

    static let indexTypes: Set<String> = ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"]

    static func readOCILayout(_ root: String, reference: String?) throws -> ([Layer], String) {
        let layoutFile = root + "/oci-layout"
        struct Layout: Decodable { var imageLayoutVersion: String }
        let layout = try decode(Layout.self, file: layoutFile)
        guard layout.imageLayoutVersion.hasPrefix("1.") else {
            throw Error.badJSON(file: layoutFile, reason: "imageLayoutVersion \(layout.imageLayoutVersion) is not 1.x")
        }
        var indexFile = root + "/index.json"
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

    /// Extracts the regular files of a docker save archive under `dir`. Names with ".." are refused;
    /// symlinks and hard links between layer files (older docker versions share layer.tar files that way)
    /// become copies of files already extracted.
    static func spill(archive: String, into dir: String) throws {
        let reader = try ArchiveReader(path: archive)
        var links: [(String, String)] = []
        while let entry = try reader.next() {
            let parts = entry.path.split(separator: "/").filter { $0 != "." && !$0.isEmpty }
            guard !parts.contains("..") else { throw Error.unsafeArchivePath(archive: archive, entry: entry.path) }
            let relative = parts.joined(separator: "/")
            let target = dir + "/" + relative
            switch entry.kind {
            case .directory:
                try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
            case .regular:
                try FileManager.default.createDirectory(atPath: (target as NSString).deletingLastPathComponent,
                                                        withIntermediateDirectories: true)
                guard FileManager.default.createFile(atPath: target, contents: nil),
                      let handle = FileHandle(forWritingAtPath: target) else { throw Error.missingFile(path: target) }
                defer { try? handle.close() }
                try reader.readData { chunk in try handle.write(contentsOf: Data(chunk)) }
            case .symlink, .hardlink:
                // Resolved lexically inside the archive: a symlink relative to its directory, a hard link from the top.
                let link = entry.kind == .symlink ? entry.symlinkTarget ?? "" : entry.hardlinkTarget ?? ""
                var resolved = entry.kind == .symlink && !link.hasPrefix("/") ? Array(parts.dropLast()) : []
                for c in link.split(separator: "/") where c != "." && !c.isEmpty {
                    if c == ".." {
                        guard !resolved.isEmpty else { throw Error.unsafeArchivePath(archive: archive, entry: entry.path) }
                        resolved.removeLast()
                    } else {
                        resolved.append(c)
                    }
                }
                links.append((relative, resolved.joined(separator: "/")))
            default:
                continue
            }
        }
        for (name, source) in links {
            let to = dir + "/" + name, from = dir + "/" + source
            guard FileManager.default.fileExists(atPath: from) else { throw Error.missingFile(path: "\(archive): \(source) (linked from \(name))") }
            try FileManager.default.createDirectory(atPath: (to as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try? FileManager.default.removeItem(atPath: to)
            try FileManager.default.linkItem(atPath: from, toPath: to)
        }
    }

    static func readDockerManifest(root: String, label: String, reference: String?) throws -> ([Layer], String) {
        let manifestFile = root + "/manifest.json"
        guard FileManager.default.fileExists(atPath: manifestFile) else { throw Error.notAnImage(path: label) }
        let entries = try decode([DockerManifestEntry].self, file: manifestFile)
        let chosen: DockerManifestEntry?
        if let reference {
            chosen = entries.first { $0.RepoTags?.contains(reference) ?? false }
        } else {
            chosen = entries.first
        }
        guard let chosen else {
            throw Error.noManifest(file: "\(label): manifest.json", reason: reference.map { "no image is tagged '\($0)'" } ?? "lists no images")
        }
        func inside(_ name: String) throws -> String {
            guard !name.split(separator: "/").contains("..") else { throw Error.unsafeArchivePath(archive: label, entry: name) }
            let p = root + "/" + name
            guard FileManager.default.fileExists(atPath: p) else { throw Error.missingFile(path: "\(label): \(name)") }
            return p
        }
        let configFile = try inside(chosen.Config)
        let ids = try diffIDs(decode(Config.self, file: configFile), file: "\(label): \(chosen.Config)")
        guard ids.count == chosen.Layers.count else {
            throw Error.layerCountMismatch(config: "\(label): \(chosen.Config)", diffIDs: ids.count, layers: chosen.Layers.count)
        }
        let chain = ImageDigest.chainIDs(ids)
        var layers: [Layer] = []
        for (i, name) in chosen.Layers.enumerated() {
            let file = try inside(name)
            // Docker 25 and later store layers as OCI blobs: their name is their digest.
            var blob: String?
            if name.hasPrefix("blobs/sha256/") {
                let d = "sha256:" + name.dropFirst("blobs/sha256/".count)
                if ImageDigest.isValid(d) { blob = d }
            }
            layers.append(Layer(index: i, path: file, mediaType: "application/vnd.docker.image.rootfs.diff.tar", blobDigest: blob,
                                diffID: ids[i], chainID: chain[i]))
        }
        return (layers, try ImageDigest.sha256(file: configFile))
    }
}
