using OffloadRpc.TestContracts;

namespace OffloadRpc.Fuzz;

/// <summary>Implementations that return quickly and bounded whatever the arguments (a fuzzed call must not sleep or allocate on request).</summary>
internal sealed class FuzzServices : IFuzzContract, IKitchenSink, IImageService
{
    public ValueTask<int> CountSamplesAsync(Sample[] samples, CancellationToken ct = default) => ValueTask.FromResult(samples.Length);

    public ValueTask<int> CountWordsAsync(string[] words, List<string?> more) => ValueTask.FromResult(words.Length + more.Count);

    public ValueTask<Node> EchoNodeAsync(Node node) => ValueTask.FromResult(node);

    public ValueTask<long> MixedAsync(int a, string? text, ReadOnlyMemory<byte> data, byte[] copy, Node[]? nodes, Dictionary<string, Sample[]> map) =>
        ValueTask.FromResult((long)a + (text?.Length ?? 0) + data.Length + copy.Length + (nodes?.Length ?? 0) + map.Count);

    public ValueTask<Sample[]> MakeSamplesAsync(int count) => ValueTask.FromResult(new Sample[Math.Clamp(count, 0, 16)]);

    public ValueTask<Dictionary<string, Node>> IndexAsync(List<Node> nodes)
    {
        var index = new Dictionary<string, Node>();
        foreach (Node node in nodes)
        {
            index[node.Name ?? string.Empty] = node;
        }

        return ValueTask.FromResult(index);
    }

    public ValueTask<ReadOnlyMemory<int>> SliceAsync(ReadOnlyMemory<int> values, int start) =>
        ValueTask.FromResult(values[Math.Clamp(start, 0, values.Length)..]);

    // IKitchenSink
    public Task<string> ConcatAsync(string a, string? b) => Task.FromResult(a + b);

    public Task DoNothingAsync() => Task.CompletedTask;

    public ValueTask<Channel> NextChannelAsync(Channel channel) => ValueTask.FromResult(channel);

    public Task<List<string>> SplitAsync(string text, char separator) => Task.FromResult(new List<string> { text, separator.ToString() });

    public Task<double[]> ScaleAsync(double[] values, double factor) => Task.FromResult(values);

    public ValueTask<double> SumAsync(ReadOnlyMemory<float> floats, Memory<int> ints) => ValueTask.FromResult((double)floats.Length + ints.Length);

    public ValueTask<long> TotalLengthAsync(ReadOnlyMemory<byte> first, byte[] second, SharedBuffer third, ReadOnlyMemory<byte> fourth)
    {
        long total = first.Length + second.Length + third.Length + fourth.Length;
        third.Dispose();
        return ValueTask.FromResult(total);
    }

    public ValueTask<ReadOnlyMemory<byte>> ReverseAsync(ReadOnlyMemory<byte> data) => ValueTask.FromResult(data);

    public Task<int[]?> MaybeAsync(int[]? values) => Task.FromResult(values);

    public Task<string[]> WordsAsync(string[] words, Dictionary<string, int> counts) => Task.FromResult(words);

    public Task<decimal> AddDecimalAsync(decimal a, decimal b) => Task.FromResult(decimal.Zero);

    public Task<DateTime> ShiftAsync(DateTime moment, TimeSpan by) => Task.FromResult(moment);

    public Task<(int Count, string Text)> TupleAsync(int count, string text) => Task.FromResult((count, text));

    public Task SleepAsync(int milliseconds, CancellationToken cancellationToken) => Task.CompletedTask; // never sleeps for a fuzzed duration

    public Task<int> CancellationsObservedAsync() => Task.FromResult(0);

    public Task FailAsync(string message) => throw new InvalidOperationException(message);

    public Task<string> WhoCalledAsync() => Task.FromResult(OffloadCallContext.Current?.PeerProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? string.Empty);

    public Task<SharedBuffer?> MaybeLeaseAsync(int length) =>
        Task.FromResult(length <= 0 ? null : OffloadCallContext.Current?.Rent(Math.Min(length, 256)));

    public Task<int> RejectAsync(SharedBuffer frame) => throw new InvalidOperationException("rejected " + frame.Length);

    public async ValueTask<long[]> ConsumeStreamAsync(Stream data, CancellationToken cancellationToken = default)
    {
        byte[] buffer = new byte[4096];
        long total = 0;
        int read;
        while ((read = await data.ReadAsync(buffer, cancellationToken).ConfigureAwait(false)) > 0)
        {
            total += read;
        }

        return [total];
    }

    public async ValueTask<long[]> CopyStreamAsync(Stream data, bool useAsync, CancellationToken cancellationToken = default)
    {
        using var sink = new MemoryStream();
        if (useAsync)
        {
            await data.CopyToAsync(sink, cancellationToken).ConfigureAwait(false);
        }
        else
        {
            data.CopyTo(sink);
        }

        return [0, sink.Length, 0, 0, 0];
    }

    public async ValueTask<long[]> VerifyPatternAsync(Stream data, CancellationToken cancellationToken = default)
    {
        byte[] buffer = new byte[4096];
        long read = 0;
        int n;
        while ((n = await data.ReadAsync(buffer, cancellationToken).ConfigureAwait(false)) > 0)
        {
            read += n;
        }

        return [read, -1, -1];
    }

    public async ValueTask<long> ReadPrefixAsync(Stream data, int bytes, CancellationToken cancellationToken = default)
    {
        byte[] buffer = new byte[4096];
        long read = 0;
        int n;
        while (read < bytes && (n = await data.ReadAsync(buffer.AsMemory(0, (int)Math.Min(buffer.Length, bytes - read)), cancellationToken).ConfigureAwait(false)) > 0)
        {
            read += n;
        }

        return read;
    }

    public async ValueTask<long> CountBytesAsync(IAsyncEnumerable<ReadOnlyMemory<byte>> chunks)
    {
        long total = 0;
        await foreach (ReadOnlyMemory<byte> chunk in chunks.ConfigureAwait(false))
        {
            total += chunk.Length;
        }

        return total;
    }

    // IImageService
    public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

    public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => ValueTask.FromResult((ulong)frame.Length);

    public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => ValueTask.FromResult(data);

    public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default) =>
        ValueTask.FromResult(new[] { new Detection { X = batch.Length, Label = options.Label } });

    public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default) =>
        ValueTask.FromResult(OffloadCallContext.Current!.Rent(Math.Clamp(width, 0, 64)));

    public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default)
    {
        frame.Dispose();
        return ValueTask.CompletedTask;
    }
}
