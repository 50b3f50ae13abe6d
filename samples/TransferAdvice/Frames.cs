using OffloadRpc;

namespace TransferAdvice;

// Built on purpose with code the OffloadRpc analyzers warn about: `dotnet build samples/TransferAdvice`.
[OffloadService]
public interface IFrameSink
{
    Task SendAsync(byte[] frame);                                                        // OFFRPC2004: a copy on the server

    Task UploadAsync([Transfer(TransferMode.Copy)] ReadOnlyMemory<byte> batch);          // fine as declared...

    Task HeaderAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass, ExpectedBytes = 64)] ReadOnlyMemory<byte> header); // OFFRPC2003

    Task StreamAsync([Transfer(TransferMode.Offload)] ReadOnlyMemory<byte> frame);

    Task KeepAsync(SharedBuffer frame);
}

public static class Uploader
{
    public static async Task StreamFramesAsync(IFrameSink sink, OffloadRpcConnection connection)
    {
        byte[] frame = new byte[16 << 20];                                              // large enough to offload (a 1 MiB one would be OFFRPC2003)
        Task pending = sink.StreamAsync(frame);
        frame[0] = 1;                                                                   // OFFRPC2005: the workers may still be copying it
        await pending;

        SharedBuffer lease = connection.Rent(4096);
        await sink.KeepAsync(lease);
        lease.Dispose();                                                                // OFFRPC2006: the lease moved with the call
    }

    public static Task UploadBatchAsync(IFrameSink sink) =>
        sink.UploadAsync(new byte[256 * 3 * 224 * 224 * 4]);                             // OFFRPC2001: 154 MB copied by the caller
}
