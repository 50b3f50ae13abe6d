using OffloadRpc;

namespace TransferAdvice;

// Built on purpose with code the OffloadRpc analyzers warn about: `dotnet build samples/TransferAdvice`.
[OffloadService]
public interface IFrameSink
{
    Task SendAsync(byte[] frame);                                                        // OFFRPC2004: a copy on the server

    Task UploadAsync([Transfer(TransferMode.Copy)] ReadOnlyMemory<byte> batch);          // fine as declared...

    Task HeaderAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass, ExpectedBytes = 64)] ReadOnlyMemory<byte> header); // OFFRPC2003
}

public static class Uploader
{
    public static Task UploadBatchAsync(IFrameSink sink) =>
        sink.UploadAsync(new byte[256 * 3 * 224 * 224 * 4]);                             // OFFRPC2001: 154 MB copied by the caller
}
