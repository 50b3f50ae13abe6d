using System.Diagnostics;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OffloadRpc;
using OpenTelemetry.Resources;
using OpenTelemetry.Trace;

namespace HostedWorker;

internal static class Client
{
    public static readonly ActivitySource Source = new("HostedWorker");

    public static async Task RunAsync(string endpoint)
    {
        HostApplicationBuilder builder = Host.CreateApplicationBuilder();
        builder.Services.AddOffloadRpcClient<IGreeter>(endpoint, options => options.DefaultDeadline = TimeSpan.FromSeconds(10))
            .AddInterceptor<TimingInterceptor>();
        builder.Services.AddHealthChecks().AddOffloadRpcClient(endpoint);
        builder.Services.AddHostedService<GreetingWorker>();
        builder.Services.AddOpenTelemetry()
            .ConfigureResource(resource => resource.AddService("hosted-worker-client"))
            .WithTracing(tracing => tracing.AddSource("HostedWorker", OffloadRpcTelemetry.ActivitySourceName).AddConsoleExporter());
        using IHost host = builder.Build();
        await host.RunAsync();
    }
}

/// <summary>Calls the server once it starts: a header for a scope, a deadline, a buffer; then stops the application.</summary>
internal sealed class GreetingWorker(IGreeter greeter, IHostApplicationLifetime lifetime, ILogger<GreetingWorker> logger) : BackgroundService
{
    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        try
        {
            using Activity? batch = Client.Source.StartActivity("greet-batch");     // the root of the trace both processes share
            logger.LogInformation("Trace {TraceId}", batch?.TraceId);

            using (OffloadCallScope.Begin().WithHeader("tenant", "acme"))
            {
                logger.LogInformation("{Greeting}", await greeter.GreetAsync("world", stoppingToken));
                byte[] frame = new byte[4 << 20];
                Random.Shared.NextBytes(frame);
                logger.LogInformation("Checksum of a 4 MiB frame: {Checksum:x16}", await greeter.ChecksumAsync(frame, stoppingToken));

                using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(300)))
                {
                    try
                    {
                        await greeter.SlowAsync(5_000, stoppingToken);
                    }
                    catch (DeadlineExceededException ex)
                    {
                        logger.LogInformation("As expected: {Message}", ex.Message);
                    }
                }
            }

            try
            {
                await greeter.GreetAsync("nobody", stoppingToken);                   // no tenant header
            }
            catch (RemoteInvocationException ex)
            {
                logger.LogInformation("Refused by the server's interceptor: {Type}: {Message}", ex.RemoteExceptionType, ex.RemoteMessage);
            }
        }
        finally
        {
            lifetime.StopApplication();
        }
    }
}

/// <summary>Logs each call's duration and argument sizes.</summary>
internal sealed class TimingInterceptor(ILogger<TimingInterceptor> logger) : ClientInterceptor
{
    public override async ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation)
    {
        long started = Stopwatch.GetTimestamp();
        try
        {
            return await continuation(context);
        }
        finally
        {
            logger.LogInformation("{Method} took {Elapsed:F2} ms ({Bytes} bytes of buffers)", context.FullName, Stopwatch.GetElapsedTime(started).TotalMilliseconds, context.RequestPayloadBytes);
        }
    }
}
