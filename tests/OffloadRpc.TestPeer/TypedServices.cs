using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using OffloadRpc;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;

/// <summary>The typed server the end-to-end tests call: real work on real bytes, so content is verified on both sides.</summary>
internal static class TypedServer
{
    public static async Task<int> RunAsync(string endpoint, bool versioned)
    {
        await using var server = new OffloadRpcServer(endpoint);
        server.Register<IImageService>(new ImageService());
        server.Register<IKitchenSink>(new KitchenSink());
        server.Register<IFrameSource>(new FrameSource());
        if (versioned)
        {
            server.Register<IVersioned>(new Versioned());
        }

        server.ConnectionFailed += ex => Console.WriteLine($"FAILED {ex.GetType().FullName}: {ex.Message}");
        await server.StartAsync();
        Console.WriteLine($"READY {server.SocketPath}");
        await Task.Run(() => Console.In.ReadToEnd());
        return 0;
    }
}

internal sealed class ImageService : IImageService
{
    public ValueTask<int> AddAsync(int a, int b, CancellationToken ct = default) => ValueTask.FromResult(a + b);

    public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> frame, CancellationToken ct = default) => ValueTask.FromResult(Checksum64.Compute(frame.Span));

    public ValueTask<byte[]> EchoAsync(byte[] data, CancellationToken ct = default) => ValueTask.FromResult(data);

    /// <summary>One detection per 1 KiB block whose mean is above the threshold: real work over the whole batch.</summary>
    public ValueTask<Detection[]> DetectAsync(ReadOnlyMemory<byte> batch, DetectOptions options, CancellationToken ct = default)
    {
        var found = new List<Detection>();
        ReadOnlySpan<byte> data = batch.Span;
        for (int block = 0; block * 1024 < data.Length; block++)
        {
            ReadOnlySpan<byte> slice = data.Slice(block * 1024, Math.Min(1024, data.Length - block * 1024));
            long sum = 0;
            foreach (byte b in slice)
            {
                sum += b;
            }

            float mean = sum / (float)slice.Length / 255f;
            if (mean > options.Threshold)
            {
                found.Add(new Detection { X = block, Y = slice.Length, Score = mean, Label = options.Label });
            }
        }

        return ValueTask.FromResult(found.ToArray());
    }

    /// <summary>Renders into shared memory rented from the calling connection: returned without a copy.</summary>
    public ValueTask<SharedBuffer> RenderAsync(int width, int height, CancellationToken ct = default)
    {
        SharedBuffer frame = OffloadCallContext.Current!.Rent(checked(width * height * 3));
        Checksum64.Fill(frame.Span, (ulong)(width * 31 + height));
        return ValueTask.FromResult(frame);
    }

    /// <summary>The first 8 bytes carry the checksum of the rest; a frame whose content differs fails the call.</summary>
    public ValueTask ProcessAsync(SharedBuffer frame, CancellationToken ct = default)
    {
        using (frame)
        {
            ulong expected = BinaryPrimitives.ReadUInt64LittleEndian(frame.Span);
            ulong actual = Checksum64.Compute(frame.Span[8..]);
            if (expected != actual)
            {
                throw new InvalidDataException($"frame checksum {actual:x16}, expected {expected:x16}");
            }
        }

        return ValueTask.CompletedTask;
    }
}

internal sealed class KitchenSink : IKitchenSink
{
    private static int s_cancellations;

    public Task<string> ConcatAsync(string a, string? b) => Task.FromResult(a + (b ?? "<null>"));

    public Task DoNothingAsync() => Task.CompletedTask;

    public ValueTask<Channel> NextChannelAsync(Channel channel) => ValueTask.FromResult((Channel)(((int)channel + 1) % 3));

    public Task<List<string>> SplitAsync(string text, char separator) => Task.FromResult(text.Split(separator).ToList());

    public Task<double[]> ScaleAsync(double[] values, double factor) => Task.FromResult(values.Select(v => v * factor).ToArray());

    public ValueTask<double> SumAsync(ReadOnlyMemory<float> floats, Memory<int> ints)
    {
        double sum = 0;
        foreach (float f in floats.Span)
        {
            sum += f;
        }

        foreach (int i in ints.Span)
        {
            sum += i;
        }

        return ValueTask.FromResult(sum);
    }

    public ValueTask<long> TotalLengthAsync(ReadOnlyMemory<byte> first, byte[] second, SharedBuffer third, ReadOnlyMemory<byte> fourth)
    {
        using (third)
        {
            return ValueTask.FromResult((long)first.Length + second.Length + third.Length + fourth.Length);
        }
    }

    public ValueTask<ReadOnlyMemory<byte>> ReverseAsync(ReadOnlyMemory<byte> data)
    {
        byte[] reversed = data.ToArray();
        Array.Reverse(reversed);
        return ValueTask.FromResult<ReadOnlyMemory<byte>>(reversed);
    }

    public Task<int[]?> MaybeAsync(int[]? values) => Task.FromResult(values?.Select(v => -v).ToArray());

    public Task<string[]> WordsAsync(string[] words, Dictionary<string, int> counts) =>
        Task.FromResult(words.Select(w => $"{w}={counts.GetValueOrDefault(w)}").ToArray());

    public Task<decimal> AddDecimalAsync(decimal a, decimal b) => Task.FromResult(a + b);

    public Task<DateTime> ShiftAsync(DateTime moment, TimeSpan by) => Task.FromResult(moment + by);

    public Task<(int Count, string Text)> TupleAsync(int count, string text) => Task.FromResult((count * 2, text + text));

    public async Task SleepAsync(int milliseconds, CancellationToken cancellationToken)
    {
        if (OffloadCallContext.Current?.CancellationToken != cancellationToken)
        {
            throw new InvalidOperationException("the context's token is not the method's");
        }

        try
        {
            await Task.Delay(milliseconds, cancellationToken);
        }
        catch (OperationCanceledException)
        {
            Interlocked.Increment(ref s_cancellations);
            throw;
        }
    }

    public Task<int> CancellationsObservedAsync() => Task.FromResult(Volatile.Read(ref s_cancellations));

    public Task FailAsync(string message) => throw new InvalidOperationException(message);

    public async Task<string> WhoCalledAsync()
    {
        await Task.Yield(); // the context flows across awaits
        OffloadCallContext context = OffloadCallContext.Current ?? throw new InvalidOperationException("no call context");
        return $"{context.PeerProcessId}:{context.PeerUserId}{(context.IsPeerVerified ? "" : " unverified")}";
    }

    public async ValueTask<long[]> ConsumeStreamAsync(Stream data, CancellationToken cancellationToken = default)
    {
        byte[] all = new byte[data.Length];
        int read = await data.ReadAsync(all, cancellationToken); // returns once the first chunk has landed
        long firstRead = System.Diagnostics.Stopwatch.GetTimestamp();
        while (read < all.Length)
        {
            int n = await data.ReadAsync(all.AsMemory(read), cancellationToken);
            if (n == 0)
            {
                break;
            }

            read += n;
        }

        return [(long)Checksum64.Compute(all.AsSpan(0, read)), read, firstRead];
    }

    public async ValueTask<long[]> CopyStreamAsync(Stream data, bool useAsync, CancellationToken cancellationToken = default)
    {
        long knownLength = 1;
        try
        {
            _ = data.Length;
        }
        catch (NotSupportedException)
        {
            knownLength = 0;
        }

        using var sink = new NotingSink();
        if (useAsync)
        {
            await data.CopyToAsync(sink, cancellationToken);
        }
        else
        {
            data.CopyTo(sink);
        }

        byte[] all = sink.ToArray();
        return [(long)Checksum64.Compute(all), all.Length, sink.Writes, sink.InPlaceWrites, knownLength];
    }

    /// <summary>Keeps what is written and counts the writes, and those handed over in place.</summary>
    private sealed class NotingSink : WriteSink
    {
        private readonly MemoryStream _written = new();

        public long Writes { get; private set; }

        public long InPlaceWrites { get; private set; }

        public byte[] ToArray() => _written.ToArray();

        protected override void Consume(ReadOnlySpan<byte> bytes, bool inPlace)
        {
            Writes++;
            InPlaceWrites += inPlace ? 1 : 0;
            _written.Write(bytes);
        }
    }

    public async ValueTask<long[]> VerifyPatternAsync(Stream data, CancellationToken cancellationToken = default)
    {
        long length;
        try
        {
            length = data.Length; // known when the client's stream could tell, though the server's cannot seek
        }
        catch (NotSupportedException)
        {
            length = -1;
        }

        byte[] buffer = new byte[1 << 20];
        long read = 0;
        long wrong = -1;
        int n;
        while ((n = await data.ReadAsync(buffer, cancellationToken)) > 0)
        {
            if (wrong < 0)
            {
                wrong = BlockPattern.FirstMismatch(buffer.AsSpan(0, n), read);
            }

            read += n;
        }

        return [read, wrong, length];
    }

    public async ValueTask<long> ReadPrefixAsync(Stream data, int bytes, CancellationToken cancellationToken = default)
    {
        byte[] buffer = new byte[64 << 10];
        long read = 0;
        while (read < bytes)
        {
            int n = await data.ReadAsync(buffer.AsMemory(0, (int)Math.Min(buffer.Length, bytes - read)), cancellationToken);
            if (n == 0)
            {
                break;
            }

            read += n;
        }

        return read;
    }

    public async ValueTask<long> CountBytesAsync(IAsyncEnumerable<ReadOnlyMemory<byte>> chunks)
    {
        long total = 0;
        await foreach (ReadOnlyMemory<byte> chunk in chunks)
        {
            foreach (byte b in chunk.Span)
            {
                total += b == 7 ? 1 : 0;
            }
        }

        return total;
    }

    public async Task<int> RejectAsync(SharedBuffer frame)
    {
        await Task.Yield(); // off the receive thread first: the give-back must not depend on a synchronous throw
        throw new InvalidOperationException($"rejected a frame of {frame.Length} bytes starting with {frame.Span[0]}");
    }

    public Task<SharedBuffer?> MaybeLeaseAsync(int length)
    {
        if (length < 0)
        {
            return Task.FromResult<SharedBuffer?>(null);
        }

        SharedBuffer lease = OffloadCallContext.Current!.Rent(length);
        lease.Span.Fill(0x5A);
        return Task.FromResult<SharedBuffer?>(lease);
    }
}

internal sealed class Versioned : IVersioned
{
    public Task<long> ScaleAsync(long value, int factor) => Task.FromResult(value * factor);
}

/// <summary>Server streams with real content; producers record what they did, for the backpressure and cancellation tests.</summary>
internal sealed class FrameSource : IFrameSource
{
    private static readonly ConcurrentDictionary<string, Progress> s_progress = new();

    public async IAsyncEnumerable<Tick> TicksAsync(int count, string label, [EnumeratorCancellation] CancellationToken ct = default)
    {
        for (int i = 0; i < count; i++)
        {
            ct.ThrowIfCancellationRequested();
            yield return new Tick { Index = i, Label = label, Checksum = Checksum64.Compute(BitConverter.GetBytes(i)) };
            if (i % 64 == 63)
            {
                await Task.Yield();
            }
        }
    }

    public async IAsyncEnumerable<ReadOnlyMemory<byte>> FramesAsync(int count, int size, int seed, [EnumeratorCancellation] CancellationToken ct = default)
    {
        byte[] frame = new byte[size];
        for (int i = 0; i < count; i++)
        {
            ct.ThrowIfCancellationRequested();
            Checksum64.Fill(frame, (ulong)(seed + i));
            yield return frame; // copied into shared memory before the producer is asked for the next one
        }

        await Task.CompletedTask;
    }

    public async IAsyncEnumerable<ReadOnlyMemory<int>> NumbersAsync(int count, int length, [EnumeratorCancellation] CancellationToken ct = default)
    {
        int[] numbers = new int[length];
        for (int i = 0; i < count; i++)
        {
            for (int j = 0; j < length; j++)
            {
                numbers[j] = (i * 1000) + j;
            }

            yield return numbers;
        }

        await Task.CompletedTask;
    }

    public async IAsyncEnumerable<int> FailingAsync(int after, [EnumeratorCancellation] CancellationToken ct = default)
    {
        for (int i = 0; i < after; i++)
        {
            yield return i;
        }

        await Task.Yield();
        throw new InvalidOperationException($"producer failed after {after}");
    }

    public async IAsyncEnumerable<ReadOnlyMemory<byte>> EndlessAsync(string tag, int size, [EnumeratorCancellation] CancellationToken ct = default)
    {
        var progress = s_progress.GetOrAdd(tag, _ => new Progress());
        byte[] frame = new byte[size];
        try
        {
            for (int i = 0; ; i++)
            {
                ct.ThrowIfCancellationRequested();
                Checksum64.Fill(frame, (ulong)i);
                Interlocked.Increment(ref progress.Produced);
                yield return frame;
                await Task.Yield();
            }
        }
        finally
        {
            progress.Cancelled = ct.IsCancellationRequested;
            progress.Finished = true;
        }
    }

    public async IAsyncEnumerable<SharedBuffer> RenderAsync(int count, int size, int seed, [EnumeratorCancellation] CancellationToken ct = default)
    {
        OffloadCallContext context = OffloadCallContext.Current ?? throw new InvalidOperationException("no call context in a streamed result");
        for (int i = 0; i < count; i++)
        {
            SharedBuffer frame = context.Rent(size);
            Checksum64.Fill(frame.Span, (ulong)(seed + i));
            yield return frame; // rendered in shared memory: the consumer owns it from here
        }

        await Task.CompletedTask;
    }

    public async ValueTask<int> CountTicksAsync(IAsyncEnumerable<Tick> ticks, CancellationToken ct = default)
    {
        int count = 0;
        await foreach (Tick tick in ticks.WithCancellation(ct))
        {
            if (tick.Index != count || tick.Checksum != Checksum64.Compute(BitConverter.GetBytes(count)))
            {
                throw new InvalidDataException($"tick {count} arrived as index {tick.Index}");
            }

            count++;
        }

        return count;
    }

    public async ValueTask<ulong> ChecksumLeasesAsync(IAsyncEnumerable<SharedBuffer> frames, CancellationToken ct = default)
    {
        ulong combined = 0;
        await foreach (SharedBuffer frame in frames.WithCancellation(ct))
        {
            using (frame)
            {
                combined = (combined * 31) + Checksum64.Compute(frame.Span);
            }
        }

        return combined;
    }

    public async ValueTask<int> HoardLeasesAsync(IAsyncEnumerable<SharedBuffer> frames, int failAfter, CancellationToken ct = default)
    {
        var kept = new List<SharedBuffer>();
        await foreach (SharedBuffer frame in frames.WithCancellation(ct))
        {
            kept.Add(frame); // never disposed
            if (kept.Count == failAfter)
            {
                throw new InvalidOperationException($"failed holding {kept.Count} leases");
            }
        }

        return kept.Count;
    }

    public async IAsyncEnumerable<int> HoardEachAsync(IAsyncEnumerable<SharedBuffer> frames, int failAfter, [EnumeratorCancellation] CancellationToken ct = default)
    {
        var kept = new List<SharedBuffer>();
        await foreach (SharedBuffer frame in frames.WithCancellation(ct))
        {
            kept.Add(frame); // never disposed
            yield return frame.Length;
            if (kept.Count == failAfter)
            {
                throw new InvalidOperationException($"failed holding {kept.Count} leases");
            }
        }
    }

    public async ValueTask<int> SlowDrainAsync(string tag, IAsyncEnumerable<int> values, int delayMs, CancellationToken ct = default)
    {
        Progress progress = s_progress.GetOrAdd(tag, _ => new Progress());
        int count = 0;
        try
        {
            await foreach (int value in values.WithCancellation(ct))
            {
                if (value != count)
                {
                    throw new InvalidDataException($"value {count} arrived as {value}");
                }

                count++;
                Volatile.Write(ref progress.Produced, count);
                await Task.Delay(delayMs, ct);
            }
        }
        catch (Exception ex)
        {
            progress.Error = ex is RemoteInvocationException remote ? $"{remote.RemoteExceptionType}: {remote.RemoteMessage}" : $"{ex.GetType().FullName}: {ex.Message}";
            progress.Cancelled = ex is OperationCanceledException;
            throw;
        }
        finally
        {
            progress.Finished = true;
        }

        return count;
    }

    public async IAsyncEnumerable<ulong> ChecksumEachAsync(IAsyncEnumerable<ReadOnlyMemory<int>> frames, [EnumeratorCancellation] CancellationToken ct = default)
    {
        await foreach (ReadOnlyMemory<int> frame in frames.WithCancellation(ct))
        {
            yield return Checksum64.Compute(System.Runtime.InteropServices.MemoryMarshal.AsBytes(frame.Span));
        }
    }

    public async IAsyncEnumerable<int> LabelLengthsAsync(IAsyncEnumerable<Tick> ticks, [EnumeratorCancellation] CancellationToken ct = default)
    {
        await foreach (Tick tick in ticks.WithCancellation(ct))
        {
            yield return tick.Label?.Length ?? -1;
        }
    }

    public async ValueTask<ulong> FirstChecksumAsync(IAsyncEnumerable<ReadOnlyMemory<int>> frames, CancellationToken ct = default)
    {
        IAsyncEnumerator<ReadOnlyMemory<int>> first = frames.GetAsyncEnumerator(ct); // never disposed, on purpose
        return await first.MoveNextAsync() ? Checksum64.Compute(System.Runtime.InteropServices.MemoryMarshal.AsBytes(first.Current.Span)) : 0;
    }

    public ValueTask<byte[]> FillAsync(int length, int seed, CancellationToken ct = default)
    {
        byte[] frame = GC.AllocateUninitializedArray<byte>(length);
        Checksum64.Fill(frame, (ulong)seed);
        return ValueTask.FromResult(frame);
    }

    public ValueTask<ProducerStatus> StatusAsync(string tag, CancellationToken ct = default)
    {
        Progress progress = s_progress.GetOrAdd(tag, _ => new Progress());
        using var self = System.Diagnostics.Process.GetCurrentProcess();
        return ValueTask.FromResult(new ProducerStatus
        {
            Produced = Volatile.Read(ref progress.Produced),
            Cancelled = progress.Cancelled,
            Finished = progress.Finished,
            ResidentBytes = self.WorkingSet64,
            Error = progress.Error,
        });
    }

    private sealed class Progress
    {
        public int Produced;
        public volatile bool Cancelled;
        public volatile bool Finished;
        public volatile string? Error;
    }
}
