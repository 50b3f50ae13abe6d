using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text.Json;
using Grpc.Core;
using Grpc.Net.Client;
using OffloadRpc.Cli;
using Spectre.Console;

namespace OffloadRpc.PeerBench;

/// <summary>
/// <c>--streams</c>: server streaming of 4K RGB frames (3840 x 2160 x 3 = 24,883,200 bytes) as
/// <see cref="SharedBuffer"/> items (rented and stamped by the producer, no render), as
/// <c>ReadOnlyMemory&lt;byte&gt;</c> items (copied into shared memory per frame, lent to the consumer in
/// place), and over gRPC server streaming (a <c>bytes</c> message per frame); then a 64 MiB checksum
/// through a pipelined <c>Stream</c> argument against the unary <c>ReadOnlyMemory&lt;byte&gt;</c> one, with
/// the copy and read floors of the same run. All in one run, each system's server its own process.
/// </summary>
internal static class StreamBench
{
    public const int FrameBytes = 3840 * 2160 * 3;

    /// <summary>The producer's stamp: frame index and <see cref="Stopwatch.GetTimestamp"/> (CLOCK_MONOTONIC, one clock for every process of the machine).</summary>
    public static void Stamp(Span<byte> frame, long index)
    {
        BinaryPrimitives.WriteInt64LittleEndian(frame, index);
        BinaryPrimitives.WriteInt64LittleEndian(frame[8..], Stopwatch.GetTimestamp());
    }

    private static (long Index, double AgeMicroseconds) ReadStamp(ReadOnlySpan<byte> frame, long now) =>
        (BinaryPrimitives.ReadInt64LittleEndian(frame), (now - BinaryPrimitives.ReadInt64LittleEndian(frame[8..])) * 1e6 / Stopwatch.Frequency);

    internal sealed record FrameRow(string System, int Frames, double Seconds, double FramesPerSecond, double MicrosecondsPerFrame, double MedianAgeMicroseconds, double P99AgeMicroseconds, double GigabytesPerSecond);

    internal sealed record ChecksumRow(string Path, long Bytes, double Milliseconds, double MinimumMilliseconds, double GigabytesPerSecond);

    /// <param name="checksumsOnly">--checksums: only the 64 MiB checksums (no frame streams, no gRPC server).</param>
    public static async Task<int> RunAsync(TimeSpan window, string? json, bool checksumsOnly = false)
    {
        string directory = Path.Combine(Path.GetTempPath(), $"offloadrpc-peerbench-streams-{Environment.ProcessId}");
        Directory.CreateDirectory(directory);
        try
        {
            string offloadEndpoint = Path.Combine(directory, "offloadrpc.sock");
            string grpcEndpoint = Path.Combine(directory, "grpc.sock");
            await using ServerProcess offloadServer = await ServerProcess.StartAsync("offloadrpc", offloadEndpoint);
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(offloadEndpoint);
            IPeerBenchService service = connection.GetService<IPeerBenchService>();
            (List<FrameRow> rows, double? unary64) = checksumsOnly ? ([], null) : await FrameStreamsAsync(service, grpcEndpoint, window);
            List<ChecksumRow> checksums = await ChecksumsAsync(service, window);
            ReportChecksums(checksums);

            if (json is not null)
            {
                await File.WriteAllTextAsync(json, JsonSerializer.Serialize(new { frameBytes = FrameBytes, windowSeconds = window.TotalSeconds, unary64Microseconds = unary64, frames = rows, checksums }, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower }));
                AnsiConsole.MarkupLine($"wrote {Markup.Escape(json)}");
            }

            return 0;
        }
        finally
        {
            try
            {
                Directory.Delete(directory, recursive: true);
            }
            catch (IOException)
            {
            }
        }
    }

    private static async Task<(List<FrameRow> Rows, double? Unary64Microseconds)> FrameStreamsAsync(IPeerBenchService service, string grpcEndpoint, TimeSpan window)
    {
        await using ServerProcess grpcServer = await ServerProcess.StartAsync("grpc", grpcEndpoint);
        using GrpcChannel channel = GrpcChannelFor(grpcEndpoint);
        var grpc = new Grpc.PeerBench.PeerBenchClient(channel);
        AnsiConsole.MarkupLine($"[bold]OffloadRpc peer benchmark, streams[/]: {FrameBytes:N0}-byte frames (4K RGB), window {window.TotalSeconds:0.#} s per system after {window.TotalSeconds / 4:0.#} s warm-up; StreamWindow {new OffloadRpcOptions().StreamWindow}");
        double unary64 = await UnaryLatencyAsync(service, window);
        var rows = new List<FrameRow>
        {
            await MeasureAsync("offloadrpc-sharedbuffer", window, ct => Consume(service.FramesSharedAsync(int.MaxValue, FrameBytes, ct), f => f.Span, dispose: true)),
            await MeasureAsync("offloadrpc-readonlymemory", window, ct => Consume(service.FramesAsync(int.MaxValue, FrameBytes, ct), f => f.Span, dispose: false)),
            await MeasureAsync("grpc-uds-server-streaming", window, ct => GrpcFrames(grpc, ct)),
        };

        var table = new Table().AddColumns("system", "frames", "frames/s", "us/frame (1/rate)", "stamp age median us", "stamp age p99 us", "GB/s");
        foreach (FrameRow row in rows)
        {
            table.AddRow(row.System, row.Frames.ToString(CultureInfo.InvariantCulture), row.FramesPerSecond.ToString("N1", CultureInfo.InvariantCulture), row.MicrosecondsPerFrame.ToString("N1", CultureInfo.InvariantCulture),
                row.MedianAgeMicroseconds.ToString("N0", CultureInfo.InvariantCulture), row.P99AgeMicroseconds.ToString("N0", CultureInfo.InvariantCulture), row.GigabytesPerSecond.ToString("N2", CultureInfo.InvariantCulture));
        }

        AnsiConsole.Write(table);
        AnsiConsole.MarkupLine("stamp age: producer's stamp to the consumer's MoveNextAsync; it includes the time an item waits in the window (up to StreamWindow frames queued), so it is not the per-frame cost.");
        FrameRow shared = rows[0];
        FrameRow grpcRow = rows[2];
        AnsiConsole.MarkupLine($"target SharedBuffer >= 50x gRPC frames/s: {shared.FramesPerSecond / grpcRow.FramesPerSecond:N1}x");
        AnsiConsole.MarkupLine($"target SharedBuffer per-frame cost <= 3x a 64 B unary call ({unary64:N1} us median): {shared.MicrosecondsPerFrame / unary64:N2}x");
        return (rows, unary64);
    }

    private static void ReportChecksums(List<ChecksumRow> checksums)
    {
        var sums = new Table().AddColumns("64 MiB checksum", "ms (median)", "ms (min)", "GB/s");
        foreach (ChecksumRow row in checksums)
        {
            sums.AddRow(Markup.Escape(row.Path), row.Milliseconds.ToString("N2", CultureInfo.InvariantCulture), row.MinimumMilliseconds.ToString("N2", CultureInfo.InvariantCulture), row.GigabytesPerSecond.ToString("N2", CultureInfo.InvariantCulture));
        }

        AnsiConsole.Write(sums);
        double copy = checksums.First(r => r.Path == "floor: copy 64 MiB").Milliseconds;
        double read = checksums.First(r => r.Path == "floor: read (checksum) 64 MiB").Milliseconds;
        double unary = checksums.First(r => r.Path.StartsWith("offloadrpc unary", StringComparison.Ordinal)).Milliseconds;
        foreach (ChecksumRow row in checksums.Where(r => r.Path.StartsWith("offloadrpc pipelined Stream", StringComparison.Ordinal)))
        {
            AnsiConsole.MarkupLine($"target pipelined <= 1.25x max(copy, read), {Markup.Escape(row.Path)}: {row.Milliseconds / Math.Max(copy, read):N2}x; / unary: {row.Milliseconds / unary:N2}x");
        }
    }

    /// <summary>Enumerates frames, checking each one's index (a frame that did not arrive cannot be counted), and yields each one's stamp age.</summary>
    private static async IAsyncEnumerable<double> Consume<T>(IAsyncEnumerable<T> frames, SpanOf<T> span, bool dispose)
    {
        long expected = 0;
        await foreach (T frame in frames)
        {
            long now = Stopwatch.GetTimestamp();
            (long index, double age) = ReadStamp(span(frame), now);
            ReadOnlySpan<byte> bytes = span(frame);
            if (index != expected++ || bytes.Length != FrameBytes || bytes[^1] + bytes[FrameBytes / 2] == 511)
            {
                throw new InvalidDataException($"frame {expected - 1} arrived as frame {index} of {bytes.Length} bytes");
            }

            if (dispose)
            {
                ((IDisposable)frame!).Dispose();
            }

            yield return age;
        }
    }

    private delegate ReadOnlySpan<byte> SpanOf<T>(T frame);

    private static async IAsyncEnumerable<double> GrpcFrames(Grpc.PeerBench.PeerBenchClient client, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken ct)
    {
        using AsyncServerStreamingCall<Grpc.Frame> call = client.Frames(new Grpc.FramesRequest { Count = int.MaxValue, Size = FrameBytes }, cancellationToken: ct);
        long expected = 0;
        while (true)
        {
            bool more;
            try
            {
                more = await call.ResponseStream.MoveNext(ct);
            }
            catch (RpcException ex) when (ex.StatusCode == StatusCode.Cancelled)
            {
                yield break;
            }

            if (!more)
            {
                yield break;
            }

            ReadOnlySpan<byte> bytes = call.ResponseStream.Current.Data.Span;
            (long index, double age) = ReadStamp(bytes, Stopwatch.GetTimestamp());
            if (index != expected++ || bytes.Length != FrameBytes)
            {
                throw new InvalidDataException($"gRPC frame {expected - 1} arrived as frame {index} of {bytes.Length} bytes");
            }

            yield return age;
        }
    }

    /// <summary>Warm-up (a quarter of the window), then counts frames over the window; breaking out cancels the producer.</summary>
    private static async Task<FrameRow> MeasureAsync(string system, TimeSpan window, Func<CancellationToken, IAsyncEnumerable<double>> stream)
    {
        using var cts = new CancellationTokenSource();
        var ages = new List<double>(4096);
        long warmupEnd = Stopwatch.GetTimestamp() + (long)(window.TotalSeconds / 4 * Stopwatch.Frequency);
        long started = 0;
        long end = long.MaxValue;
        int frames = 0;
        await foreach (double age in stream(cts.Token))
        {
            long now = Stopwatch.GetTimestamp();
            if (started == 0)
            {
                if (now < warmupEnd)
                {
                    continue;
                }

                started = now;
                end = now + (long)(window.TotalSeconds * Stopwatch.Frequency);
                continue;
            }

            frames++;
            ages.Add(age);
            if (now >= end)
            {
                break;
            }
        }

        double seconds = (Stopwatch.GetTimestamp() - started) / (double)Stopwatch.Frequency;
        cts.Cancel();
        ages.Sort();
        double rate = frames / seconds;
        var row = new FrameRow(system, frames, seconds, rate, 1e6 / rate, ages[ages.Count / 2], ages[(int)(ages.Count * 0.99)], rate * FrameBytes / 1e9);
        AnsiConsole.MarkupLine($"  {Markup.Escape(system)}: {rate:N1} frames/s");
        return row;
    }

    private static async Task<double> UnaryLatencyAsync(IPeerBenchService service, TimeSpan window)
    {
        var samples = new List<double>(100_000);
        long warmupEnd = Stopwatch.GetTimestamp() + (long)(window.TotalSeconds / 4 * Stopwatch.Frequency);
        while (Stopwatch.GetTimestamp() < warmupEnd)
        {
            await service.AddAsync(1, 2);
        }

        long end = Stopwatch.GetTimestamp() + (long)(window.TotalSeconds * Stopwatch.Frequency);
        while (Stopwatch.GetTimestamp() < end)
        {
            long start = Stopwatch.GetTimestamp();
            if (await service.AddAsync(samples.Count, 1) != samples.Count + 1)
            {
                throw new InvalidDataException("a wrong sum");
            }

            samples.Add((Stopwatch.GetTimestamp() - start) * 1e6 / Stopwatch.Frequency);
        }

        samples.Sort();
        return samples[samples.Count / 2];
    }

    private static async Task<List<ChecksumRow>> ChecksumsAsync(IPeerBenchService service, TimeSpan window)
    {
        const int Bytes = 64 << 20;
        byte[] data = GC.AllocateUninitializedArray<byte>(Bytes, pinned: true);
        new Random(64).NextBytes(data);
        byte[] target = GC.AllocateUninitializedArray<byte>(Bytes, pinned: true);
        target.AsSpan().Clear();
        ulong expected = PayloadChecksum.Compute(data);
        int rounds = Math.Max(5, (int)(window.TotalSeconds * 10));

        double Median(List<double> values)
        {
            values.Sort();
            return values[values.Count / 2];
        }

        async Task<ChecksumRow> Time(string path, Func<Task<ulong>> run)
        {
            var times = new List<double>(rounds);
            for (int i = 0; i < rounds + 2; i++)
            {
                long start = Stopwatch.GetTimestamp();
                ulong checksum = await run();
                double ms = (Stopwatch.GetTimestamp() - start) * 1e3 / Stopwatch.Frequency;
                if (checksum != expected)
                {
                    throw new InvalidDataException($"{path}: checksum {checksum:x16}, expected {expected:x16}");
                }

                if (i >= 2)
                {
                    times.Add(ms);
                }
            }

            double median = Median(times);
            return new ChecksumRow(path, Bytes, median, times.Min(), Bytes / median / 1e6);
        }

        var copyTimes = new List<double>(rounds);
        for (int i = 0; i < rounds + 2; i++)
        {
            long start = Stopwatch.GetTimestamp();
            data.AsSpan().CopyTo(target);
            double ms = (Stopwatch.GetTimestamp() - start) * 1e3 / Stopwatch.Frequency;
            if (i >= 2)
            {
                copyTimes.Add(ms);
            }
        }

        double copy = Median(copyTimes);
        var rows = new List<ChecksumRow> { new("floor: copy 64 MiB", Bytes, copy, copyTimes.Min(), Bytes / copy / 1e6) };
        rows.Add(await Time("floor: read (checksum) 64 MiB", () => Task.FromResult(PayloadChecksum.Compute(target))));
        rows.Add(await Time("offloadrpc unary ReadOnlyMemory<byte>", async () => await service.ChecksumAsync(data)));
        rows.Add(await Time("offloadrpc pipelined Stream argument, server ReadAsync into a 1 MiB array", async () => await service.ChecksumStreamAsync(new MemoryStream(data, writable: false))));
        rows.Add(await Time("offloadrpc pipelined Stream argument, server CopyToAsync", async () => await service.ChecksumStreamCopyToAsync(new MemoryStream(data, writable: false))));
        rows.Add(await Time("offloadrpc pipelined Stream argument that cannot seek (ring), server CopyToAsync", async () => await service.ChecksumStreamCopyToAsync(new UnseekableStream(data))));
        return rows;
    }

    /// <summary>A memory stream that says it cannot seek, as a pipe or a socket: its length is unknown until it ends.</summary>
    private sealed class UnseekableStream(byte[] data) : MemoryStream(data, writable: false)
    {
        public override bool CanSeek => false;
    }

    private static GrpcChannel GrpcChannelFor(string socketPath)
    {
        var handler = new SocketsHttpHandler
        {
            ConnectCallback = async (_, cancellationToken) =>
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), cancellationToken);
                    return new NetworkStream(socket, ownsSocket: true);
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            },
            InitialHttp2StreamWindowSize = Servers.ClientWindowBytes,
        };
        return GrpcChannel.ForAddress("http://localhost", new GrpcChannelOptions { HttpHandler = handler, MaxReceiveMessageSize = null, MaxSendMessageSize = null });
    }
}
