import Testing
@testable import ThinFS

@Suite struct SizeTests {
    @Test(arguments: [
        ("4096", UInt64(4096)),        // plain bytes
        ("64K", 64 << 10),            // kibibytes
        ("64KiB", 64 << 10),          // with the binary suffix
        ("512k", 512 << 10),          // lower case
        ("100G", 100 << 30),          // Docker's loop data size
        ("2M", 2 << 20),
        ("1T", 1 << 40),
        ("7B", 7),
    ])
    func parses(text: String, bytes: UInt64) throws {
        #expect(try ByteSize.parse(text) == bytes)
    }

    @Test(arguments: ["", "12Q", "K", "1.5G", "-1", "64 K", "99999999999999999999", "16777216T"])
    func rejects(text: String) {
        #expect(throws: ByteSize.ParseError.self) { try ByteSize.parse(text) }
    }

    @Test func formats() {
        #expect(ByteSize.format(64 << 10) == "64K")
        #expect(ByteSize.format(3 << 30) == "3G")
        #expect(ByteSize.format(1000) == "1000")
    }
}
