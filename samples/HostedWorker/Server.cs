using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OffloadRpc;
using OpenTelemetry.Metrics;
using OpenTelemetry.Resources;
using OpenTelemetry.Trace;

namespace HostedWorker;

internal static class Server
{
    public static async Task RunAsync(string endpoint)
    {
        HostApplicationBuilder builder = Host.CreateApplicationBuilder();
        builder.Services.AddSingleton<GreetingCounter>();                    // a dependency of the implementation
        builder.Services.AddOffloadRpcServer(endpoint)
            .AddService<IGreeter, Greeter>()                                 // a Greeter per call, in a DI scope of its own
            .AddInterceptor<TenantInterceptor>();                            // resolved from DI for each call
        builder.Services.AddHealthChecks().AddOffloadRpcServer();            // healthy while listening
        builder.Services.AddOpenTelemetry()
            .ConfigureResource(resource => resource.AddService("hosted-worker-server"))
            .WithTracing(tracing => tracing.AddSource(OffloadRpcTelemetry.ActivitySourceName).AddConsoleExporter())
            .WithMetrics(metrics => metrics.AddMeter(OffloadRpcTelemetry.MeterName).AddConsoleExporter()); // printed when the host stops

        using IHost host = builder.Build();
        StopWhenInputCloses(host);                                           // the demo's client process stops us so
        await host.RunAsync();
    }

    private static void StopWhenInputCloses(IHost host)
    {
        if (!Console.IsInputRedirected)
        {
            return; // interactive: Ctrl+C stops the host
        }

        _ = Task.Run(() =>
        {
            Console.In.ReadToEnd();
            host.Services.GetRequiredService<IHostApplicationLifetime>().StopApplication();
        });
    }
}

internal sealed class GreetingCounter
{
    private int _count;

    public int Next() => Interlocked.Increment(ref _count);
}

internal sealed class Greeter(GreetingCounter counter, ILogger<Greeter> logger) : IGreeter
{
    public ValueTask<string> GreetAsync(string name, CancellationToken ct = default)
    {
        string tenant = OffloadCallContext.Current!.RequestHeaders["tenant"];   // checked by TenantInterceptor
        logger.LogInformation("Greeting {Name} for tenant {Tenant}", name, tenant);
        return ValueTask.FromResult($"Hello {name} (tenant {tenant}, greeting #{counter.Next()}, server process {Environment.ProcessId})");
    }

    public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default)
    {
        ulong sum = 14695981039346656037;
        foreach (byte b in data.Span)
        {
            sum = (sum ^ b) * 1099511628211;
        }

        return ValueTask.FromResult(sum);
    }

    public async ValueTask SlowAsync(int milliseconds, CancellationToken ct = default)
    {
        try
        {
            await Task.Delay(milliseconds, OffloadCallContext.Current!.CancellationToken); // fires at the caller's deadline
        }
        catch (OperationCanceledException)
        {
            logger.LogInformation("SlowAsync stopped at the caller's deadline ({Deadline:O})", OffloadCallContext.Current!.Deadline);
            throw;
        }
    }
}

/// <summary>Refuses calls without a "tenant" header; the caller gets a RemoteInvocationException.</summary>
internal sealed class TenantInterceptor(ILogger<TenantInterceptor> logger) : ServerInterceptor
{
    public override async ValueTask<TResult> InterceptAsync<TResult>(ServerInterceptorContext context, ServerCallContinuation<TResult> continuation)
    {
        if (!context.RequestHeaders.ContainsKey("tenant"))
        {
            throw new UnauthorizedAccessException($"{context.MethodName} needs a tenant header.");
        }

        TResult result = await continuation(context);                 // the method's typed result
        logger.LogInformation("{Method}: {RequestBytes} request bytes in shared memory, result {Result}", context.MethodName, context.RequestPayloadBytes, result);
        return result;
    }
}
