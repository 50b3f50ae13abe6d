using System.Collections.Concurrent;
using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Runtime.CompilerServices;
using OffloadRpc;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;

/// <summary>
/// Serves <see cref="ICallProbe"/> through the core API with a server interceptor, an implementation made
/// per call, and (with --traces) an ActivityListener and a MeterListener on "OffloadRpc" whose records
/// the tests read back through <see cref="ICallProbe.ServerLogAsync"/>.
/// </summary>
internal static class ProbeServer
{
    public static async Task<int> RunAsync(string endpoint, string[] args)
    {
        using ActivityListener? spans = args.Contains("--traces") ? ListenToSpans() : null;
        using MeterListener? metrics = args.Contains("--traces") ? ListenToMetrics() : null;
        var options = new OffloadRpcOptions();
        options.ServerInterceptors.Add(new ProbeServerInterceptor());
        await using var server = new OffloadRpcServer(endpoint, options);
        server.Register<ICallProbe>(_ => new CallProbe(new ProbeDependency()));
        server.ConnectionFailed += ex => Console.WriteLine($"FAILED {ex.GetType().FullName}: {ex.Message}");
        await server.StartAsync();
        Console.WriteLine($"READY {server.SocketPath}");
        await Task.Run(() => Console.In.ReadToEnd());
        return 0;
    }

    /// <summary>One call of <see cref="ICallProbe.ChecksumAsync"/> on a fresh connection (a client process for the hosting tests).</summary>
    public static async Task<int> CallAsync(string endpoint, string[] args)
    {
        try
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(endpoint);
            byte[] data = new byte[64 << 10];
            Checksum64.Fill(data, 11);
            ulong sum = await connection.GetService<ICallProbe>().ChecksumAsync(data);
            Console.WriteLine(sum == Checksum64.Compute(data) ? "OK" : "WRONG");
        }
        catch (Exception ex)
        {
            Console.WriteLine($"FAILED {ex.GetType().FullName}: {ex.Message}");
        }

        return 0;
    }

    /// <summary>
    /// Calls <see cref="ICallProbe.WaitForCancelAsync"/>(60000) over a raw connection whose request carries a deadline of
    /// <paramref name="deadlineMs"/> ms and which never cancels the call (no caller-side timer): only the server's own
    /// timer can end it before a minute. Prints "REPLY ok" or "REPLY fault type".
    /// </summary>
    public static async Task<int> DeadlineOnlyAsync(string endpoint, OffloadRpc.Transport.TransportOptions options, int deadlineMs)
    {
        RuntimeHelpers.RunModuleConstructor(typeof(ICallProbe).Module.ModuleHandle);
        int method = OffloadRpc.Internal.ServiceRegistry.Find<ICallProbe>()!.Methods.First(m => m.Name == nameof(ICallProbe.WaitForCancelAsync)).Id;
        var metadata = new System.Buffers.ArrayBufferWriter<byte>();
        OffloadRpc.Internal.CallMetadata.Encode(metadata, null, TimeSpan.FromMilliseconds(deadlineMs), traceParent: null, traceState: null);
        byte[] arguments = [0x91, 0xCD, 0xEA, 0x60]; // [60000]
        byte[] body = new byte[4 + metadata.WrittenCount + arguments.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(body, (uint)metadata.WrittenCount);
        metadata.WrittenSpan.CopyTo(body.AsSpan(4));
        arguments.CopyTo(body.AsSpan(4 + metadata.WrittenCount));

        await using OffloadRpc.Transport.RpcConnection connection = await OffloadRpc.Transport.Handshake.ConnectAsync(endpoint, options, [], null, CancellationToken.None);
        try
        {
            using OffloadRpc.Transport.RpcReply reply = await connection.CallAsync(method, body, default, OffloadRpc.Transport.MessageFlags.HasMetadata, CancellationToken.None);
            Console.WriteLine("REPLY ok");
        }
        catch (RemoteInvocationException ex)
        {
            Console.WriteLine($"REPLY fault {ex.RemoteExceptionType}");
        }

        return 0;
    }

    /// <summary>Records every OffloadRpc span that ends in this process in <see cref="ProbeLog"/>.</summary>
    internal static ActivityListener ListenToSpans()
    {
        var listener = new ActivityListener
        {
            ShouldListenTo = source => source.Name == OffloadRpcTelemetry.ActivitySourceName,
            Sample = (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllDataAndRecorded,
            ActivityStopped = activity => ProbeLog.Add($"span {activity.Kind} {activity.DisplayName} {activity.TraceId} parent={activity.ParentSpanId} system={activity.GetTagItem("rpc.system")} method={activity.GetTagItem("rpc.method")} status={activity.GetTagItem("rpc.offloadrpc.status_code")}"),
        };
        ActivitySource.AddActivityListener(listener);
        return listener;
    }

    /// <summary>Records every server-side OffloadRpc measurement in <see cref="ProbeLog"/> (instrument, method, status).</summary>
    internal static MeterListener ListenToMetrics()
    {
        var listener = new MeterListener
        {
            InstrumentPublished = (instrument, l) =>
            {
                if (instrument.Meter.Name == OffloadRpcTelemetry.MeterName && instrument.Name.Contains("server", StringComparison.Ordinal))
                {
                    l.EnableMeasurementEvents(instrument);
                }
            },
        };
        listener.SetMeasurementEventCallback<double>((instrument, value, tags, _) => Record(instrument, tags));
        listener.SetMeasurementEventCallback<long>((instrument, value, tags, _) => Record(instrument, tags));
        listener.Start();
        return listener;

        static void Record(Instrument instrument, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            string method = "", status = "";
            foreach (KeyValuePair<string, object?> tag in tags)
            {
                if (tag.Key == "rpc.method")
                {
                    method = tag.Value as string ?? "";
                }
                else if (tag.Key == "rpc.offloadrpc.status_code")
                {
                    status = tag.Value as string ?? "";
                }
            }

            ProbeLog.Add($"metric {instrument.Name} {method} {status}".TrimEnd());
        }
    }
}

/// <summary>What the server saw, for the tests to read back.</summary>
internal static class ProbeLog
{
    private static readonly ConcurrentQueue<string> s_lines = new();

    public static void Add(string line)
    {
        s_lines.Enqueue(line);
        while (s_lines.Count > 2000)
        {
            s_lines.TryDequeue(out _);
        }
    }

    public static string[] Snapshot() => s_lines.ToArray();
}

/// <summary>
/// Refuses calls carrying a "deny" header (short-circuit by throwing), answers the method named in a
/// "skip" header itself (short-circuit by returning: a void method's <see cref="NoResult"/>, or the
/// "cached" header's value for a string result, as a cache would), and records what it saw of every other
/// call, with its typed result. Streamed results: records each item and the end, and ("stream-cached")
/// answers with items of its own.
/// </summary>
internal sealed class ProbeServerInterceptor : ServerInterceptor
{
    public override async ValueTask<TResult> InterceptAsync<TResult>(ServerInterceptorContext context, ServerCallContinuation<TResult> continuation)
    {
        if (context.RequestHeaders.TryGetValue("deny", out string? why))
        {
            ProbeLog.Add($"denied {context.MethodName} {why}");
            throw new UnauthorizedAccessException($"denied: {why} ({context.FullName} of {context.ServiceName})");
        }

        if (context.RequestHeaders.TryGetValue("skip", out string? skipped) && skipped == context.MethodName)
        {
            ProbeLog.Add($"skipped {context.MethodName}");
            if (typeof(TResult) == typeof(string))
            {
                return (TResult)(object)(context.RequestHeaders.TryGetValue("cached", out string? cached) ? cached : "skipped");
            }

            return default!;
        }

        try
        {
            TResult result = await continuation(context);
            ProbeLog.Add($"intercepted {context.MethodName} request={context.RequestBodyBytes}+{context.RequestPayloadBytes} result={result} ok");
            return result;
        }
        catch (Exception ex)
        {
            ProbeLog.Add($"intercepted {context.MethodName} failed {ex.GetType().Name}");
            throw;
        }
    }

    public override async IAsyncEnumerable<TItem> InterceptStream<TItem>(ServerInterceptorContext context, ServerStreamContinuation<TItem> continuation)
    {
        if (context.RequestHeaders.TryGetValue("deny", out string? why))
        {
            ProbeLog.Add($"denied stream {context.MethodName} {why}");
            throw new UnauthorizedAccessException("denied: " + why);
        }

        if (context.RequestHeaders.TryGetValue("stream-cached", out string? cached) && typeof(TItem) == typeof(string))
        {
            ProbeLog.Add($"stream cached {context.MethodName}");
            foreach (string item in cached.Split(','))
            {
                yield return (TItem)(object)item;
            }

            yield break;
        }

        int count = 0;
        await foreach (TItem item in continuation(context))
        {
            count++;
            ProbeLog.Add($"stream item {context.MethodName} {item}");
            yield return item;
        }

        ProbeLog.Add($"stream ended {context.MethodName} items={count} tenant={(context.RequestHeaders.TryGetValue("tenant", out string? tenant) ? tenant : "none")}");
    }
}

internal sealed class ProbeDependency : IDisposable
{
    private static int s_next;

    public int Number { get; } = Interlocked.Increment(ref s_next);

    public bool Disposed { get; private set; }

    public void Dispose()
    {
        Disposed = true;
        ProbeLog.Add($"disposed dependency {Number}");
    }
}

internal sealed class CallProbe : ICallProbe, IUploadProbe
{
    private static int s_next;
    private static string s_lastOutcome = "none";
    private readonly int _number = Interlocked.Increment(ref s_next);
    private readonly ProbeDependency _dependency;

    public CallProbe(ProbeDependency dependency) => _dependency = dependency;

    public ValueTask<string[]> HeadersAsync(CancellationToken ct = default) =>
        ValueTask.FromResult(OffloadCallContext.Current!.RequestHeaders.Select(h => $"{h.Key}={h.Value}").Order(StringComparer.Ordinal).ToArray());

    public async ValueTask<string> WaitForCancelAsync(int milliseconds, CancellationToken ct = default)
    {
        OffloadCallContext call = OffloadCallContext.Current!;
        string deadline = call.Deadline is null ? "no" : "yes";
        Volatile.Write(ref s_lastOutcome, "waiting");
        try
        {
            await Task.Delay(milliseconds, call.CancellationToken);
            Volatile.Write(ref s_lastOutcome, "completed");
            return "completed";
        }
        catch (OperationCanceledException)
        {
            Volatile.Write(ref s_lastOutcome, $"cancelled deadline={deadline}");
            throw;
        }
    }

    public async ValueTask<string> ChecksumAfterAsync(ReadOnlyMemory<byte> data, int milliseconds, CancellationToken ct = default)
    {
        OffloadCallContext call = OffloadCallContext.Current!;
        string deadline = call.Deadline is null ? "no" : "yes";
        Volatile.Write(ref s_lastOutcome, "waiting");
        try
        {
            await Task.Delay(milliseconds, ct);
        }
        catch (OperationCanceledException)
        {
            Volatile.Write(ref s_lastOutcome, $"cancelled deadline={deadline}");
            throw;
        }

        Volatile.Write(ref s_lastOutcome, "completed");
        return $"{Checksum64.Compute(data.Span)} headers={Headers(call)}";
    }

    public ValueTask<string> LastOutcomeAsync(CancellationToken ct = default) => ValueTask.FromResult(Volatile.Read(ref s_lastOutcome));

    public ValueTask<string> TraceAsync(CancellationToken ct = default) =>
        ValueTask.FromResult(Activity.Current is { } span ? $"{span.TraceId} {span.ParentSpanId} {span.SpanId}" : "none");

    public ValueTask<string> InstanceAsync(CancellationToken ct = default) =>
        ValueTask.FromResult($"{_number} {_dependency.Number}{(_dependency.Disposed ? " disposed" : "")}");

    public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default) => ValueTask.FromResult(Checksum64.Compute(data.Span));

    public ValueTask<string[]> ServerLogAsync(CancellationToken ct = default) => ValueTask.FromResult(ProbeLog.Snapshot());

    public ValueTask PingAsync(CancellationToken ct = default) => ValueTask.CompletedTask;

    public async IAsyncEnumerable<string> WatchAsync(int count, int delayMs, [EnumeratorCancellation] CancellationToken ct = default)
    {
        OffloadCallContext call = OffloadCallContext.Current!;
        ProbeLog.Add($"watch ran {count}");
        string deadline = call.Deadline is null ? "no" : "yes";
        string seen = $"headers={Headers(call)} deadline={deadline} trace={(Activity.Current is { } span ? $"{span.TraceId} {span.ParentSpanId}" : "none")}";
        Volatile.Write(ref s_lastOutcome, "streaming");
        for (int i = 0; i < count; i++)
        {
            if (i > 0)
            {
                try
                {
                    await Task.Delay(delayMs, ct);
                }
                catch (OperationCanceledException)
                {
                    Volatile.Write(ref s_lastOutcome, $"stream cancelled deadline={deadline}");
                    throw;
                }
            }

            yield return $"{i} {seen}";
        }

        Volatile.Write(ref s_lastOutcome, "stream completed");
    }

    public async IAsyncEnumerable<string> ChecksumEachAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, [EnumeratorCancellation] CancellationToken ct = default)
    {
        string headers = Headers(OffloadCallContext.Current!);
        await foreach (ReadOnlyMemory<ulong> chunk in chunks.WithCancellation(ct))
        {
            yield return $"{Checksum64.Compute(System.Runtime.InteropServices.MemoryMarshal.AsBytes(chunk.Span))} headers={headers}";
        }
    }

    public async ValueTask<string> ChecksumAllAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, CancellationToken ct = default)
    {
        string headers = Headers(OffloadCallContext.Current!);
        var all = new List<ulong>();
        await foreach (ReadOnlyMemory<ulong> chunk in chunks.WithCancellation(ct))
        {
            all.AddRange(chunk.ToArray());
        }

        return $"{Checksum64.Compute(System.Runtime.InteropServices.MemoryMarshal.AsBytes(all.ToArray().AsSpan()))} headers={headers}";
    }

    private static string Headers(OffloadCallContext call) =>
        string.Join(';', call.RequestHeaders.Select(h => $"{h.Key}={h.Value}").Order(StringComparer.Ordinal));
}
