using OffloadRpc;

namespace HostedWorker;

[OffloadService]
public interface IGreeter
{
    /// <summary>Greets <paramref name="name"/> on behalf of the caller's tenant (the "tenant" header).</summary>
    ValueTask<string> GreetAsync(string name, CancellationToken ct = default);

    /// <summary>A checksum of a buffer that travels through shared memory.</summary>
    ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default);

    /// <summary>Works for <paramref name="milliseconds"/>, or until the call's token fires (the caller's deadline).</summary>
    ValueTask SlowAsync(int milliseconds, CancellationToken ct = default);
}
