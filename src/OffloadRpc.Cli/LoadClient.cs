using System.Diagnostics;
using System.Globalization;
using System.Threading.Channels;

namespace OffloadRpc.Cli;

/// <summary>
/// One client process of a many-clients run (<c>offloadrpc bench --clients</c>, the peer benchmark's
/// <c>--clients</c>). Its parent (<see cref="ClientFleet"/>) drives it through stdin and stdout, one
/// line each way per step:
/// <code>
/// child:  READY pid                      connected, its calls checked
/// parent: RUN op warm-up-ms              call op in a closed loop, one call in flight
/// child:  WARM                           warmed up; still calling
/// parent: GO t0 t1                       the window, as Stopwatch timestamps (CLOCK_MONOTONIC: one clock for every process)
/// child:  RESULT calls p50 p99 max late  the calls that started at or after t0 and ended by t1 (their latencies
///                                        in us); stops calling once a call ends at or after t1; late: how far
///                                        past t0 the GO line arrived (us; 0 if in time)
/// child:  ERROR message                  a call failed or returned a wrong result; the child then exits 1
/// </code>
/// The parent sends GO only when every client is warm, and t0 far enough ahead that every client has
/// it by then: all clients measure the same window while all of them are calling. stdin closing ends
/// the child; if a call hangs after that (its server gone), it exits anyway after a few seconds.
/// The peer benchmark links this file.
/// </summary>
internal static class LoadClient
{
    /// <summary>
    /// Prints READY and follows the parent's commands until stdin closes. <paramref name="operations"/>
    /// makes one call of an operation (its argument: the call's number) and throws if the reply is
    /// wrong; <paramref name="close"/> closes the connection(s) at the end.
    /// </summary>
    public static async Task<int> ServeAsync(IReadOnlyDictionary<string, Func<long, ValueTask>> operations, Func<ValueTask> close)
    {
        ChannelReader<string> commands = ReadCommands();
        try
        {
            Console.WriteLine($"READY {Environment.ProcessId}");
            while (await commands.WaitToReadAsync())
            {
                if (!commands.TryRead(out string? line))
                {
                    continue;
                }

                string[] parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (parts is not ["RUN", string op, string warmUp] || !operations.TryGetValue(op, out Func<long, ValueTask>? call))
                {
                    throw new InvalidOperationException($"unexpected command '{line}'");
                }

                Console.WriteLine(await RunAsync(call, TimeSpan.FromMilliseconds(Number(warmUp)), commands));
            }

            await close();
            return 0;
        }
        catch (Exception ex)
        {
            return Fail(ex);
        }
    }

    /// <summary>Reports a failure to the parent (one line) and returns the exit code for it.</summary>
    public static int Fail(Exception ex)
    {
        Console.WriteLine($"ERROR {ex.GetType().Name}: {ex.Message.ReplaceLineEndings(" ")}");
        return 1;
    }

    private static async Task<string> RunAsync(Func<long, ValueTask> call, TimeSpan warmUp, ChannelReader<string> commands)
    {
        long i = 0;
        var clock = Stopwatch.StartNew();
        bool warm = false;
        string? go = null;
        while (go is null)
        {
            await call(i++);
            if (!warm && clock.Elapsed >= warmUp)
            {
                Console.WriteLine("WARM");
                warm = true;
            }

            if (warm && !commands.TryRead(out go) && commands.Completion.IsCompleted)
            {
                throw new OperationCanceledException("stdin closed before the window began");
            }
        }

        long seen = Stopwatch.GetTimestamp();
        string[] parts = go.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (parts is not ["GO", string first, string last])
        {
            throw new InvalidOperationException($"expected GO, got '{go}'");
        }

        long t0 = Number(first);
        long t1 = Number(last);
        var latencies = new LatencyLog(1 << 16);
        while (true)
        {
            long start = Stopwatch.GetTimestamp();
            await call(i++);
            long end = Stopwatch.GetTimestamp();
            if (start >= t0 && end <= t1)
            {
                latencies.Add((float)(Math.Max(1, end - start) * 1e6 / Stopwatch.Frequency));
            }

            if (end >= t1)
            {
                break;
            }
        }

        (float p50, float p99, float max) = latencies.Percentiles();
        double late = Math.Max(0, seen - t0) * 1e6 / Stopwatch.Frequency;
        return string.Create(CultureInfo.InvariantCulture, $"RESULT {latencies.Count} {p50} {p99} {max} {late:0}");
    }

    /// <summary>
    /// The parent's lines, read on a thread of their own (the calls never wait for them). When stdin
    /// closes the reader completes, and a failsafe ends the process if it has not ended on its own
    /// within 10 s (a call to a server that is gone would otherwise hang it forever).
    /// </summary>
    private static ChannelReader<string> ReadCommands()
    {
        Channel<string> lines = Channel.CreateUnbounded<string>(new UnboundedChannelOptions { SingleWriter = true, SingleReader = true });
        var reader = new Thread(() =>
        {
            while (Console.In.ReadLine() is { } line)
            {
                lines.Writer.TryWrite(line);
            }

            lines.Writer.TryComplete();
            Thread.Sleep(10_000);
            Console.Error.WriteLine("stdin closed 10 s ago and the client has not ended: exiting");
            Environment.Exit(3);
        })
        { IsBackground = true, Name = "load-client stdin" };
        reader.Start();
        return lines.Reader;
    }

    private static long Number(string text) => long.Parse(text, NumberStyles.None, CultureInfo.InvariantCulture);

    /// <summary>Latencies in us, appended without a lock (one call in flight), sorted once at the end.</summary>
    private sealed class LatencyLog(int capacity)
    {
        private float[] _values = new float[capacity];

        public int Count { get; private set; }

        public void Add(float value)
        {
            if (Count == _values.Length)
            {
                Array.Resize(ref _values, _values.Length * 2);
            }

            _values[Count++] = value;
        }

        public (float P50, float P99, float Max) Percentiles()
        {
            if (Count == 0)
            {
                return (0, 0, 0);
            }

            Span<float> sorted = _values.AsSpan(0, Count);
            sorted.Sort();
            return (sorted[Math.Min(Count - 1, (int)(0.5 * Count))], sorted[Math.Min(Count - 1, (int)(0.99 * Count))], sorted[^1]);
        }
    }
}
