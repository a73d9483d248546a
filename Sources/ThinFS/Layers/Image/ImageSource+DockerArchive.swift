import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Reading a `docker save` archive without unpacking what its manifest does not name.
///
///     read 1   every header (data skipped), manifest.json's bytes    ─▶ ArchiveIndex
///     choose   the image (RepoTags), its config and layer names, through links
///     check    their sizes (from the headers) against the scratch directory's free space
///     read 2   only those entries, each to SCRATCH/<its name in the archive>
///
/// `manifest.json` comes last in `docker save` output, so the files it names cannot be told
/// apart on one pass; a tar can be read twice instead (decompressing twice if it is compressed).
/// What is written is bounded by the named entries' sizes: a small archive whose other entries
/// expand to gigabytes writes none of them. An archive that is not a regular file (a pipe) is
/// copied to the scratch directory first, as it comes (compressed or not), to be read twice.
extension ImageSource {
    /// The largest manifest.json read into memory.
    static let maxManifestSize = 16 << 20
    /// Links followed from one name before giving up (a loop).
    static let maxLinkHops = 40

    /// What the first read learns.
    struct ArchiveIndex {
        var manifest: [UInt8]?
        /// Regular files: the ordinal of the entry holding each (the last one with that name, as
        /// extraction would keep) and its size.
        var files: [String: (ordinal: Int, size: UInt64)] = [:]
        /// Symlinks and hard links (older docker versions link layer.tar files between layers),
        /// resolved lexically inside the archive.
        var links: [String: String] = [:]

        /// The regular file that `name` (as the manifest gives it) is, through links.
        func resolve(_ name: String, label: String) throws -> String {
            var current = try ImageSource.archiveName(name, archive: label)
            var hops = 0
            while let next = links[current] {
                hops += 1
                guard hops <= ImageSource.maxLinkHops else { throw Error.missingFile(path: "\(label): \(name) (a loop of links)") }
                current = next
            }
            guard files[current] != nil else { throw Error.missingFile(path: "\(label): \(name)") }
            return current
        }
    }

    /// Reads `archive` twice and unpacks the chosen image's config and layers under `dir`.
    static func unpackDockerArchive(_ archive: String, into dir: String, reference: String?) throws -> ([Layer], String) {
        var path = archive
        var st = stat()
        if stat(archive, &st) == 0, st.st_mode & S_IFMT != S_IFREG {
            path = dir + "/archive"
            try copy(archive, to: path)
        }
        let index = try scan(path, label: archive)
        guard let manifest = index.manifest else { throw Error.notAnImage(path: archive) }
        let entries = try decode([DockerManifestEntry].self, data: Data(manifest), file: "\(archive): manifest.json")
        let chosen = try chooseDockerImage(entries, reference: reference, label: archive)
        let wanted = Set(try ([chosen.Config] + chosen.Layers).map { try index.resolve($0, label: archive) })
        try extract(wanted, from: path, label: archive, index: index, into: dir)
        if path != archive { try? FileManager.default.removeItem(atPath: path) }
        return try dockerLayers(chosen, label: archive) { name in dir + "/" + (try index.resolve(name, label: archive)) }
    }

    /// A name inside the archive, normalized: "." and empty components dropped, ".." refused.
    static func archiveName(_ name: String, archive: String) throws -> String {
        try archiveComponents(name, archive: archive).joined(separator: "/")
    }

    static func archiveComponents(_ name: String, archive: String) throws -> [Substring] {
        let parts = name.split(separator: "/").filter { $0 != "." && !$0.isEmpty }
        guard !parts.contains("..") else { throw Error.unsafeArchivePath(archive: archive, entry: name) }
        return parts
    }

    /// Read 1: the headers, and manifest.json.
    static func scan(_ path: String, label: String) throws -> ArchiveIndex {
        var index = ArchiveIndex()
        let reader = try ArchiveReader(path: path)
        var ordinal = -1
        while let entry = try reader.next() {
            ordinal += 1
            let parts = try archiveComponents(entry.path, archive: label)
            let name = parts.joined(separator: "/")
            switch entry.kind {
            case .regular:
                index.files[name] = (ordinal, entry.size)
                index.links[name] = nil
                if name == "manifest.json" { index.manifest = try reader.readAll(limit: maxManifestSize) }
            case .symlink, .hardlink:
                // A symlink resolves relative to its directory, a hard link from the top.
                let link = entry.kind == .symlink ? entry.symlinkTarget ?? "" : entry.hardlinkTarget ?? ""
                var resolved = entry.kind == .symlink && !link.hasPrefix("/") ? Array(parts.dropLast()) : []
                for c in link.split(separator: "/") where c != "." && !c.isEmpty {
                    if c == ".." {
                        guard !resolved.isEmpty else { throw Error.unsafeArchivePath(archive: label, entry: entry.path) }
                        resolved.removeLast()
                    } else {
                        resolved.append(c)
                    }
                }
                index.links[name] = resolved.joined(separator: "/")
                index.files[name] = nil
            default:
                continue
            }
        }
        return index
    }

    /// Read 2: the entries named `names` (regular files of `index`), to `dir`/name.
    static func extract(_ names: Set<String>, from path: String, label: String, index: ArchiveIndex, into dir: String) throws {
        var byOrdinal: [Int: (name: String, size: UInt64)] = [:]
        for name in names {
            if let f = index.files[name] { byOrdinal[f.ordinal] = (name, f.size) }
        }
        let needed = byOrdinal.values.reduce(UInt64(0)) { $0 + $1.size }
        var fs = statvfs()
        if statvfs(dir, &fs) == 0 {
            let available = UInt64(fs.f_bavail) * UInt64(fs.f_frsize)
            guard needed <= available else { throw Error.noRoom(archive: label, directory: dir, needed: needed, available: available) }
        }
        let reader = try ArchiveReader(path: path)
        var ordinal = -1
        var remaining = byOrdinal.count
        while remaining > 0, let entry = try reader.next() {
            ordinal += 1
            guard let (name, size) = byOrdinal[ordinal] else { continue }
            guard entry.kind == .regular, (try? archiveName(entry.path, archive: label)) == name, entry.size == size else {
                throw Error.archiveChanged(archive: label, reason: "entry \(ordinal) is no longer \(name) of \(size) bytes")
            }
            let target = dir + "/" + name
            try FileManager.default.createDirectory(atPath: (target as NSString).deletingLastPathComponent,
                                                    withIntermediateDirectories: true)
            guard FileManager.default.createFile(atPath: target, contents: nil),
                  let handle = FileHandle(forWritingAtPath: target) else { throw Error.missingFile(path: target) }
            defer { try? handle.close() }
            var written: UInt64 = 0
            try reader.readData { chunk in
                written += UInt64(chunk.count)
                guard written <= size else {
                    throw Error.archiveChanged(archive: label, reason: "\(name) holds more than the \(size) bytes its header said")
                }
                try handle.write(contentsOf: Data(chunk))
            }
            remaining -= 1
        }
        guard remaining == 0 else {
            throw Error.archiveChanged(archive: label, reason: "it ended before \(remaining) of the files its manifest names")
        }
    }

    /// Copies a stream (a pipe) to `target`, to be read twice.
    static func copy(_ source: String, to target: String) throws {
        guard let input = FileHandle(forReadingAtPath: source) else { throw Error.missingFile(path: source) }
        defer { try? input.close() }
        guard FileManager.default.createFile(atPath: target, contents: nil),
              let output = FileHandle(forWritingAtPath: target) else { throw Error.missingFile(path: target) }
        defer { try? output.close() }
        while let chunk = try input.read(upToCount: 1 << 20), !chunk.isEmpty { try output.write(contentsOf: chunk) }
    }
}
