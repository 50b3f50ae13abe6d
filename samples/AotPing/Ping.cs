using OffloadRpc;

namespace AotPing;

/// <summary>
/// The contract of the NativeAOT proof: primitives, a string and buffers only, so that its proxy and stub
/// need no reflection and no dynamic code. The test peer serves it over gRPC too (it links this file).
/// </summary>
[OffloadService]
public interface IPing
{
    ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default);

    Task<string> GreetAsync(string name);

    ValueTask<ulong> SumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default);

    Task<byte[]> ReverseAsync(byte[] data);

    ValueTask<SharedBuffer> FillAsync(int length, byte value);
}

public sealed class Ping : IPing
{
    public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

    public Task<string> GreetAsync(string name) => Task.FromResult($"hello, {name}, from process {Environment.ProcessId}");

    public ValueTask<ulong> SumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default)
    {
        ulong sum = 0;
        foreach (byte b in data.Span)
        {
            sum += b;
        }

        return ValueTask.FromResult(sum);
    }

    public Task<byte[]> ReverseAsync(byte[] data)
    {
        Array.Reverse(data);
        return Task.FromResult(data);
    }

    public ValueTask<SharedBuffer> FillAsync(int length, byte value)
    {
        SharedBuffer lease = OffloadCallContext.Current!.Rent(length);
        lease.Span.Fill(value);
        return ValueTask.FromResult(lease);
    }
}
