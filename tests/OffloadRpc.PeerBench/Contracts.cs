namespace OffloadRpc.PeerBench;

/// <summary>
/// The benchmark's service over OffloadRpc. <c>add</c>, <c>checksum</c> and <c>touch</c> as every
/// system has them; the <c>checksum</c> and <c>touch</c> payload comes in Auto mode, in each fixed
/// mode (for <c>offloadrpc-best</c>), and as a <see cref="SharedBuffer"/> the client wrote into
/// (for <c>offloadrpc-zero-copy</c>).
/// </summary>
[OffloadService]
public interface IPeerBenchService
{
    ValueTask<int> AddAsync(int a, int b);

    ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data);

    ValueTask<long> TouchAsync(ReadOnlyMemory<byte> data);

    ValueTask<ulong> ChecksumSharedAsync(SharedBuffer data);

    ValueTask<long> TouchSharedAsync(SharedBuffer data);

    ValueTask<ulong> ChecksumCopyInjectAsync([Transfer(TransferMode.Copy, CachePolicy.Inject)] ReadOnlyMemory<byte> data);

    ValueTask<long> TouchCopyInjectAsync([Transfer(TransferMode.Copy, CachePolicy.Inject)] ReadOnlyMemory<byte> data);

    ValueTask<ulong> ChecksumCopyBypassAsync([Transfer(TransferMode.Copy, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);

    ValueTask<long> TouchCopyBypassAsync([Transfer(TransferMode.Copy, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);

    ValueTask<ulong> ChecksumOffloadInjectAsync([Transfer(TransferMode.Offload, CachePolicy.Inject)] ReadOnlyMemory<byte> data);

    ValueTask<long> TouchOffloadInjectAsync([Transfer(TransferMode.Offload, CachePolicy.Inject)] ReadOnlyMemory<byte> data);

    ValueTask<ulong> ChecksumOffloadBypassAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);

    ValueTask<long> TouchOffloadBypassAsync([Transfer(TransferMode.Offload, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);

    ValueTask<ulong> ChecksumHybridInjectAsync([Transfer(TransferMode.Hybrid, CachePolicy.Inject)] ReadOnlyMemory<byte> data);

    ValueTask<long> TouchHybridInjectAsync([Transfer(TransferMode.Hybrid, CachePolicy.Inject)] ReadOnlyMemory<byte> data);

    ValueTask<ulong> ChecksumHybridBypassAsync([Transfer(TransferMode.Hybrid, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);

    ValueTask<long> TouchHybridBypassAsync([Transfer(TransferMode.Hybrid, CachePolicy.Bypass)] ReadOnlyMemory<byte> data);

    /// <summary>Frames of <paramref name="size"/> bytes rented from the connection, stamped (index, time), no render: ownership moves to the client (--streams).</summary>
    IAsyncEnumerable<SharedBuffer> FramesSharedAsync(int count, int size, CancellationToken ct = default);

    /// <summary>The same frames from one managed buffer: each item is copied into shared memory and lent to the client in place (--streams).</summary>
    IAsyncEnumerable<ReadOnlyMemory<byte>> FramesAsync(int count, int size, CancellationToken ct = default);

    /// <summary>The checksum of a Stream argument, read as its chunks land (Pipelined) (--streams).</summary>
    ValueTask<ulong> ChecksumStreamAsync(Stream data);

    /// <summary>The same checksum, the Stream argument read with CopyToAsync into a checksum sink: its chunks are handed over in place (--streams).</summary>
    ValueTask<ulong> ChecksumStreamCopyToAsync(Stream data);
}

/// <summary>The same service over StreamJsonRpc (method names are the wire names).</summary>
public interface IPeerBenchJsonRpc
{
    Task<int> AddAsync(int a, int b);

    Task<ulong> ChecksumAsync(byte[] data);

    Task<long> TouchAsync(byte[] data);
}
