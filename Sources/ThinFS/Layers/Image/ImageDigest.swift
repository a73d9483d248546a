import Crypto
import Foundation

/// "sha256:<64 hex>" digests: of files, of decompressed layer streams, and OCI chain ids.
public enum ImageDigest {
    /// True for "sha256:" followed by 64 lowercase hex digits, the only algorithm accepted (a digest
    /// names a file under blobs/, so anything else is refused rather than trusted as a path).
    public static func isValid(_ digest: String) -> Bool {
        guard digest.hasPrefix("sha256:") else { return false }
        let hex = digest.dropFirst(7)
        return hex.count == 64 && hex.allSatisfy { ("0"..."9").contains($0) || ("a"..."f").contains($0) }
    }

    public static func string(_ hash: SHA256.Digest) -> String {
        "sha256:" + hash.map { String(format: "%02x", $0) }.joined()
    }

    public static func sha256(_ bytes: some DataProtocol) -> String { string(SHA256.hash(data: bytes)) }

    /// The digest of a file's bytes as stored (a blob digest).
    public static func sha256(file path: String) throws -> String {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw CocoaError(.fileReadNoSuchFile, userInfo: [NSFilePathErrorKey: path])
        }
        defer { try? handle.close() }
        var hasher = SHA256()
        while let chunk = try handle.read(upToCount: 1 << 20), !chunk.isEmpty { hasher.update(data: chunk) }
        return string(hasher.finalize())
    }

    /// The digest of the decompressed stream (a layer's DiffID): gzip, zstd or plain, told from the bytes.
    public static func sha256(decompressing path: String) throws -> (digest: String, size: UInt64) {
        let reader = try ArchiveReader(path: path, mode: .raw)
        guard try reader.next() != nil else { return (string(SHA256.hash(data: Data())), 0) }
        var hasher = SHA256()
        var size: UInt64 = 0
        try reader.readData { chunk in
            hasher.update(bufferPointer: chunk)
            size += UInt64(chunk.count)
        }
        return (string(hasher.finalize()), size)
    }

    /// ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)) (OCI image spec, config.md).
    public static func chainIDs(_ diffIDs: [String]) -> [String] {
        var chain: [String] = []
        for d in diffIDs {
            chain.append(chain.last.map { sha256(Array("\($0) \(d)".utf8)) } ?? d)
        }
        return chain
    }
}
